"""Typed errors. Each one fails a single request or adapter; the engine keeps serving."""


class JloraError(Exception):
    """Base class of every error jlora raises on purpose."""


class AdapterError(JloraError):
    """A LoRA adapter cannot be used: bad files, incompatible shapes or modules, rank too large, bad path."""


class AdapterPathError(AdapterError):
    """An adapter path resolves outside the configured adapter roots."""


class RequestError(JloraError):
    """A request is invalid: unknown adapter, prompt too long, bad sampling values."""


class UnknownAdapterError(RequestError):
    """A request names an adapter that is not registered."""


class CapacityError(JloraError):
    """The server has no room for this now (slots, pages or queue); retry later."""


class ModelLoadError(JloraError):
    """A base checkpoint is missing, malformed or of an unsupported architecture."""


class DeviceMemoryError(JloraError):
    """At start-up: the device cannot hold the KV pages and weights the engine was configured with."""
