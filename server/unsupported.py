"""OpenAI features this server does not offer yet: refused with a clear 400 instead of being ignored."""
from server.errors import invalid_request
from server.protocol.completions import CompletionRequest


def reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.suffix:
        raise invalid_request("suffix is not supported by this model server", param="suffix")
    if request.best_of is not None and request.best_of not in (1, request.n):
        raise invalid_request("best_of other than 1 or n is not supported", param="best_of")
