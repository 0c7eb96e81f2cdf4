"""Typed errors. Each one fails a single request or adapter; the engine keeps serving."""


class JloraError(Exception):
    """Base class of every error jlora raises on purpose."""


class AdapterError(JloraError):
    """A LoRA adapter cannot be used: bad files, incompatible shapes or modules, rank too large, bad path.

    `adapter`: the registered name of the adapter at fault, where one is known; `identity`: that registration's
    identity (a replaced adapter's old and new registrations differ). The engine fails exactly the requests of
    that identity by it, never by reading the message."""

    def __init__(self, message: str = "", adapter: str | None = None, identity: str | None = None):
        super().__init__(message)
        self.adapter, self.identity = adapter, identity

    def __reduce__(self):
        return type(self), (str(self), self.adapter, self.identity)


class AdapterPathError(AdapterError):
    """An adapter path resolves outside the configured adapter roots."""


class RequestError(JloraError):
    """A request is invalid: unknown adapter, prompt too long, bad sampling values."""


class UnknownAdapterError(RequestError):
    """A request names an adapter that is not registered (`adapter`: that name)."""

    def __init__(self, message: str = "", adapter: str | None = None):
        super().__init__(message)
        self.adapter = adapter

    def __reduce__(self):
        return type(self), (str(self), self.adapter)


class CapacityError(JloraError):
    """The server has no room for this now (slots, pages or queue); retry later."""


class ModelLoadError(JloraError):
    """A base checkpoint is missing, malformed or of an unsupported architecture."""


class DeviceMemoryError(JloraError):
    """At start-up: the device cannot hold the KV pages and weights the engine was configured with."""
