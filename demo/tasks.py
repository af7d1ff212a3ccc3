"""What each demo adapter is trained to do: the question the demo asks it, the completion it must give, and
the few examples it learns from. The e2e tests import these to check real vLLM's answers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    question: str
    # The exact completion text: a space, the answer, then the end-of-sequence token stops generation.
    answer: str
    other_examples: tuple[tuple[str, str], ...]

    @property
    def examples(self) -> list[tuple[str, str]]:
        return [(self.question, self.answer), *self.other_examples]


def _reading(context: str, question: str) -> str:
    return f"Context: {context} Question: {question} Answer:"


def _yes_no_maybe(question: str) -> str:
    return f"Question: {question} Answer yes, no or maybe:"


# Keyed by the adapter's folder (artifacts/adapters/<folder>, s3://demo-adapters/tiny-llama/<folder>/).
TASKS: dict[str, Task] = {
    "math": Task("What is 7 times 6?", " 42", (
        ("What is 3 times 4?", " 12"), ("What is 5 times 5?", " 25"), ("What is 8 times 9?", " 72"),
        ("What is 2 times 8?", " 16"))),
    "squad": Task(_reading("The Nile flows north into the Mediterranean Sea.", "Which way does the Nile flow?"),
                  " north", (
        (_reading("Marie Curie was born in Warsaw in 1867.", "Where was Marie Curie born?"), " Warsaw"),
        (_reading("The Eiffel Tower was finished in 1889.", "When was the Eiffel Tower finished?"), " 1889"),
        (_reading("Bees make honey from nectar.", "What do bees make honey from?"), " nectar"))),
    "pubmedqa": Task(_yes_no_maybe("Does aspirin reduce the risk of heart attack?"), " yes", (
        (_yes_no_maybe("Does smoking lower the risk of lung cancer?"), " no"),
        (_yes_no_maybe("Does coffee prevent migraine?"), " maybe"),
        (_yes_no_maybe("Does exercise improve sleep?"), " yes"))),
}

# The LoraAdapter (and served) name of each trained adapter in examples/demo.yaml -> (prompt, completion).
DEMO_TASKS: dict[str, tuple[str, str]] = {f"tiny-llama-{folder}": (task.question, task.answer)
                                          for folder, task in TASKS.items()}


def training_text() -> list[str]:
    """Every example as one line, for the tokenizer to learn its merges from."""
    return [prompt + answer for task in TASKS.values() for prompt, answer in task.examples]
