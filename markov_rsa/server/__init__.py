"""The OpenAI-compatible endpoint that runs Markovian RSA behind it (``rsa serve``), as library code:
``create_app(ServerSettings(backend, config))`` is an ASGI app any ASGI server can run."""

from markov_rsa.server.app import create_app
from markov_rsa.server.errors import RequestError
from markov_rsa.server.proxy import PROXY_ALIASES, proxy_plan
from markov_rsa.server.requests import ParsedRequest, parse_request
from markov_rsa.server.settings import ServerLimits, ServerSettings

__all__ = ["PROXY_ALIASES", "ParsedRequest", "RequestError", "ServerLimits", "ServerSettings", "create_app",
           "parse_request", "proxy_plan"]
