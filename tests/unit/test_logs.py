import json
import logging

from loraplex.logs import JsonFormatter


def test_json_logs_carry_message_level_and_extra_fields():
    record = logging.LogRecord("loraplex.sidecar.agent", logging.WARNING, __file__, 1, "adapter %s failed", ("math",),
                               None)
    record.adapter = "math"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "adapter math failed"
    assert line["level"] == "warning" and line["logger"] == "loraplex.sidecar.agent"
    assert line["adapter"] == "math"
