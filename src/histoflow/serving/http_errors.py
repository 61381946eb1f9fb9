"""MLflow's scoring server answering malformed requests as the README promises: a 4xx whose message starts with
what was wrong and stays short.

MLflow 3.17's server (`mlflow.pyfunc.scoring_server`) hands every `POST /invocations` to its module function
`invocations(data, content_type, model, input_schema)`, looked up at each request. The served model wraps that
function when it loads inside a scoring server (`mlflow models serve`, the container of `mlflow models
build-docker`), before the first request; nothing of MLflow is copied or changed otherwise:

- no Content-Type header: 415 naming the accepted types (MLflow: HTTP 500, an AttributeError);
- `params` checked against the model's parameters before MLflow sees them: an unknown name is refused with its
  name (MLflow drops it with a log line), a wrong type with MLflow's own reason (MLflow: a 400 whose message
  starts with the whole request, megabytes of base64);
- any other error message of MLflow that repeats the request: the request cut out, the reason first.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_params_schema
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

log = logging.getLogger(__name__)

# Set in the environment of MLflow's scoring server process (mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH).
SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
# MLflow's prefix to the message of an error raised while predicting: the whole parsed request.
_ECHO = re.compile(r"^Failed to predict data .*?\nError: ", re.DOTALL)
# Anything like base64 longer than this in a message is the request's images, not a reason.
_LONG_BASE64 = re.compile(r"[A-Za-z0-9+/=]{120,}")


def install() -> bool:
    """Wrap MLflow's request handler (once per process); False when this MLflow has none to wrap."""
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "invocations", None)
    if original is None or not hasattr(scoring_server, "InvocationsResponse"):
        log.warning("this MLflow's scoring server has no invocations handler to wrap: malformed requests get "
                    "MLflow's own answers")
        return False
    if getattr(original, "histoflow_wrapped", False):
        return True

    def invocations(data, content_type, model, input_schema):
        if not content_type:
            return _error(scoring_server, 415, "the request has no Content-Type header; send one of "
                          f"{', '.join(scoring_server.CONTENT_TYPES)} (application/json: {{\"inputs\": [<base64 "
                          "image file>, ...]}})")
        problem = params_problem(data, content_type, model.metadata.get_params_schema())
        if problem:
            return _error(scoring_server, 400, problem)
        try:
            return original(data, content_type, model, input_schema)
        except MlflowException as exc:
            exc.message = short_message(exc.message)
            raise

    invocations.histoflow_wrapped = True
    scoring_server.invocations = invocations
    return True


def params_problem(data: bytes | str, content_type: str, schema) -> str | None:
    """What is wrong with a JSON request's `params` (an unknown name, a value of the wrong type), or None."""
    if schema is None or content_type.split(";")[0].strip().lower() != "application/json":
        return None
    if b'"params"' not in (data if isinstance(data, bytes) else data.encode()):  # no second parse of most bodies
        return None
    try:
        params = json.loads(data).get("params")
    except (ValueError, AttributeError):
        return None  # MLflow answers malformed JSON itself
    if params is None:
        return None
    if not isinstance(params, dict):
        return f"params must be an object of parameter names and values; got {type(params).__name__}"
    known = {spec.name: spec for spec in schema.params}
    unknown = sorted(set(params) - set(known))
    if unknown:
        offered = ", ".join(f"{name} ({spec.dtype})" for name, spec in known.items())
        return f"unknown parameter {unknown[0]!r}; this model takes {offered}"
    try:
        _enforce_params_schema(params, schema)
    except MlflowException as exc:
        return short_message(exc.message)
    return None


def short_message(message: str) -> str:
    """An MLflow error message without the request it repeats: the reason first, base64 runs elided."""
    return _LONG_BASE64.sub(lambda m: f"<{len(m.group()):,} characters>", _ECHO.sub("", message))


def _error(scoring_server: Any, status: int, message: str):
    body = json.dumps({"error_code": ErrorCode.Name(INVALID_PARAMETER_VALUE), "message": message})
    return scoring_server.InvocationsResponse(response=body, status=status, mimetype="application/json")
