"""The OpenAI-compatible endpoint that runs Markovian RSA behind it (``rsa serve``), as library code:
``create_app(ServerSettings(backend, config))`` is an ASGI app any ASGI server can run."""

from markov_rsa.server.app import create_app
from markov_rsa.server.requests import PROXY_FIELDS, ParsedRequest, RequestError, parse_request, proxy_config
from markov_rsa.server.settings import ServerLimits, ServerSettings

__all__ = ["PROXY_FIELDS", "ParsedRequest", "RequestError", "ServerLimits", "ServerSettings", "create_app",
           "parse_request", "proxy_config"]
