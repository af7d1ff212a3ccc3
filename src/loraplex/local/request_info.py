"""What an API request is, as kube-apiserver sees it: its verb and resource (RequestInfoFactory's rules), the
client that sent it (its User-Agent's product), and the metav1.Status the apiserver refuses it with. Pure
functions, for the API proxy's counting and fault injection and for the benchmarks that read its counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

# The apiserver's reason for each status code (k8s.io/apimachinery metav1.StatusReason).
STATUS_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    406: "NotAcceptable", 409: "Conflict", 410: "Expired", 413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
    503: "ServiceUnavailable", 504: "Timeout",
}
# Paths whose second segment names a namespace's own subresource rather than a resource in it.
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
TRUE_VALUES = frozenset({"1", "t", "true"})


@dataclass(frozen=True)
class RequestInfo:
    """What the apiserver's authorizer sees of a request: its verb, and the resource as `plural[.group][/sub]`
    (the path itself for requests that name no resource: discovery, /version, /openapi)."""

    verb: str
    resource: str
    name: str = ""


def request_info(method: str, path: str, query: Mapping[str, list[str]]) -> RequestInfo:
    """The verb and resource of a request, derived as the apiserver's RequestInfoFactory does."""
    method = method.upper()
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return RequestInfo(method.lower(), path)
    group = ""
    rest = parts[1:]
    if parts[0] == "apis":
        if len(rest) < 3:  # /apis/<group>/<version> is discovery
            return RequestInfo(method.lower(), path)
        group, rest = rest[0], rest[1:]
    rest = rest[1:]  # the version
    if rest and rest[0] in ("watch", "proxy") and len(rest) >= 2:  # the deprecated /watch/... form
        verb, rest = rest[0], rest[1:]
    else:
        verb = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}.get(method, method.lower())
    if rest and rest[0] == "namespaces" and len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
        rest = rest[2:]
    resource, name, subresource = [*rest, "", "", ""][:3]
    if verb == "proxy":
        subresource = ""
    if not name and verb == "get":
        watch = (query.get("watch") or [""])[0].lower()
        verb = "watch" if watch in TRUE_VALUES else "list"
    if not name and verb == "delete":
        verb = "deletecollection"
    qualified = f"{resource}.{group}" if group else resource
    return RequestInfo(verb, f"{qualified}/{subresource}" if subresource else qualified, name)


def client_name(user_agent: str) -> str:
    """The product token of a User-Agent: "kopf/1.45" is kopf, "kubectl/v1.36.2 (linux/amd64) ..." kubectl.
    aiohttp's own agent, "Python/3.11 aiohttp/3.14", names the interpreter first; the library is the client."""
    tokens = [token.split("/", 1)[0] for token in user_agent.split()]
    if len(tokens) > 1 and tokens[0] == "Python" and tokens[1] == "aiohttp":
        return "aiohttp"
    return tokens[0] if tokens else ""


def status_body(code: int, info: RequestInfo, retry_after: int | None = None) -> dict[str, Any]:
    """A metav1.Status as the apiserver words it for `code`."""
    reason = STATUS_REASONS.get(code, "InternalError" if code >= 500 else "BadRequest")
    what = f'{info.resource.split("/")[0]} "{info.name}"' if info.name else info.resource
    message = {
        409: f"Operation cannot be fulfilled on {what}: the object has been modified; "
             "please apply your changes to the latest version and try again",
        429: "Too many requests, please try again later.",
        503: "the server is currently unable to handle the request",
        500: "Internal error occurred: injected by the API proxy",
    }.get(code, f"{reason}: injected by the API proxy")
    resource, _, _ = info.resource.partition("/")
    plural, _, group = resource.partition(".")
    details: dict[str, Any] = {"kind": plural, **({"group": group} if group else {}),
                               **({"name": info.name} if info.name else {})}
    if retry_after is not None:
        details["retryAfterSeconds"] = retry_after
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details, "code": code}
