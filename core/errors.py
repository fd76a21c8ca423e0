"""kefu's exception tree.

    KefuError
    ├── ConfigError              a setting is missing or invalid (raised at start-up)
    ├── StoreError               the shared store failed (Redis down, protocol error)
    │   └── LockError            a conversation lock could not be taken, or was lost while held
    ├── DatabaseError            the SQL database failed
    ├── CryptoError              a ciphertext cannot be decrypted (unknown key id, altered or swapped data)
    ├── LLMError                 the model backend failed (see core.llm.base for its subtree)
    │   ├── ModelUnavailable     connection refused/reset, server down
    │   │   └── ModelOverloaded  the server's queue is full (Ollama 503)
    │   ├── ModelNotFound        the configured model is not on the server (Ollama 404)
    │   ├── ModelTimeout         no (complete) answer in time
    │   └── ModelOutputError     the model answered with nothing usable (empty, invalid JSON/tool call)
    ├── ToolError                a business tool failed; reported back to the model, never to the user
    └── DeliveryError            a platform API refused or failed to take a reply (after retries)

Lower-level errors (redis, SQLAlchemy, httpx, llama.cpp) are mapped to the most specific of these where
they enter kefu, with ``raise ... from exc``.
"""

from __future__ import annotations


class KefuError(Exception):
    """Root of every error kefu raises on purpose."""


class ConfigError(KefuError):
    """A setting is missing or invalid."""


class StoreError(KefuError):
    """The shared state store failed."""


class LockError(StoreError):
    """A lock could not be acquired in time, or was lost while held."""


class DatabaseError(KefuError):
    """The SQL database failed."""


class CryptoError(KefuError):
    """Encrypted data cannot be read: its key is not configured, or it was altered or moved."""


class LLMError(KefuError):
    """The model backend failed."""


class ModelUnavailable(LLMError):
    """The model server cannot be reached."""


class ModelOverloaded(ModelUnavailable):
    """The model server refuses work because its queue is full."""


class ModelNotFound(LLMError):
    """The configured model does not exist on the server."""


class ModelTimeout(LLMError):
    """The model did not answer in time."""


class ModelOutputError(LLMError):
    """The model's answer is empty or cannot be parsed."""


class ToolError(KefuError):
    """A business tool failed; the message is shown to the model as the tool result."""


class DeliveryError(KefuError):
    """A reply could not be delivered to the platform."""
