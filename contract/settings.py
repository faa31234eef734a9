"""One settings object, built once from the environment and passed explicitly.

Nothing else in bertstream reads ``os.environ``.
Every field maps to ``BERTSTREAM_<FIELD NAME IN UPPER CASE>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from contract.constants import (
    DEFAULT_MODEL,
    DEFAULT_QUEUE,
    ENV_PREFIX,
    ID_COLUMN_CHARS,
    LONG_TEXT_MODES,
    MODEL_NAME_PATTERN,
    model_family,
    served_name,
)
from contract.errors import ConfigError, quoted

MAX_PORT = 65_535
_INT32_MAX = 2**31 - 1
#: Shortest statement timeout: PostgreSQL counts whole milliseconds, and 0 means none.
MIN_DB_STATEMENT_TIMEOUT_S = 0.001
#: Longest statement timeout whose client-side guard (the timeout plus a tenth,
#: contract.results) still fits libpq's int32 milliseconds.
MAX_DB_STATEMENT_TIMEOUT_S = _INT32_MAX // 1100
#: Longest TCP keepalive idle time Linux accepts (TCP_KEEPIDLE).
MAX_DB_KEEPALIVE_S = 32_767
#: Longest Redis timeout, health-check interval, publish pause or wait (one day):
#: far past any real need, and far below what overflows (a socket timeout past
#: time_t) or parks a text or a request for good.
MAX_DURATION_S = 86_400
#: Most torch threads (far more than any machine's cores; torch overflows past int32).
MAX_TORCH_THREADS = 1_024
#: Longest API coalescing window: every single submit waits up to this long for its answer.
MAX_API_COALESCE_MS = 1_000
#: Longest time the API remembers an accepted id (ten years): Redis refuses an expiry
#: whose milliseconds overflow, and then every submit failed.
MAX_API_ID_TTL_S = 10 * 365 * 86_400
#: ``BERTSTREAM_API_MODELS`` that accepts any model name (alone, not in a list).
API_MODELS_ANY = "*"
#: Most model names ``BERTSTREAM_API_MODELS`` may list.
MAX_API_MODELS = 256
#: Upper bounds of numeric settings: name -> (the lower bound as said, the most, unit).
_UPPER_BOUNDS: dict[str, tuple[str, int, str]] = {
    "torch_threads": (">= 0", MAX_TORCH_THREADS, ""),
    "max_wait_ms": (">= 1", MAX_DURATION_S * 1000, " ms"),
    "redis_socket_timeout_s": ("> 0", MAX_DURATION_S, " seconds"),
    "redis_connect_timeout_s": ("> 0", MAX_DURATION_S, " seconds"),
    "redis_health_check_s": (">= 0", MAX_DURATION_S, " seconds"),
    "publish_retry_max_s": (">= 0", MAX_DURATION_S, " seconds"),
    "api_coalesce_ms": (">= 0", MAX_API_COALESCE_MS, " ms"),
    "api_max_wait_s": ("> 0", MAX_DURATION_S, " seconds"),
    "api_id_ttl_s": ("> 0", MAX_API_ID_TTL_S, " seconds"),
    "broker_start_wait_s": (">= 0", MAX_DURATION_S, " seconds"),
}
#: Longest queue name (``BERTSTREAM_QUEUE``), as long as a model name may be.
MAX_QUEUE_CHARS = 100
#: What a queue name may look like. It goes into Redis keys and kombu's names: the lanes
#: ``<family>.<lane>``; keys ``<prefix><family>:<host or id>`` (heartbeats, the API's
#: accepted ids, retry markers), where a node name or an id may hold ':', so a ':' in
#: the queue made two of them one key; the readers' key patterns (glob characters); and
#: kombu's bindings (control characters are its separators).
QUEUE_NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_QUEUE_CHARS - 1}}}"
#: A host name (``BERTSTREAM_METRICS_HOST``): dot-separated labels of letters, digits and
#: '-' (neither first nor last), each at most 63 characters, at most 253 in all, a
#: trailing dot allowed.
_HOST_NAME_PATTERN = (r"(?=.{1,253}\.?$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                      r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")
#: Most characters of a refused name or value an error message shows.
_SHOWN_CHARS = 60
#: Broker URLs a worker, the API and the publishing commands run on.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: Celery's in-memory transport: one process only (the demo's fallback, embedding callers).
MEMORY_BROKER = "memory://"
#: Highest Redis database index a broker URL may name (Redis's ``databases`` is an int).
MAX_REDIS_DB = _INT32_MAX
#: Query parameters of a redis:// or rediss:// URL that Celery's Redis transport (kombu)
#: takes besides ``ssl_*``; any other one (``?db=`` included) made it fail with a traceback.
_KOMBU_URL_PARAMS = frozenset({"connect_timeout", "heartbeat", "insist", "login_method",
                               "credential_provider"})
#: Database URL schemes whose port is a TCP port (checked at start: psycopg refused a port
#: past 65535 only when it connected, and that read as the database being unreachable).
_TCP_DATABASE_SCHEMES = ("postgresql", "postgres")


def _default_cache_dir() -> str:
    # XDG convention; evaluated when Settings is built, not at import.
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "bertstream")


@dataclass(frozen=True)
class Settings:
    """Every knob of bertstream. Build with :meth:`from_env`; pass it on."""

    #: Celery broker: a Redis URL (:data:`REDIS_SCHEMES`), or ``memory://``, which
    #: runs everything in one process (the demo); anything else is refused.
    broker_url: str = "redis://localhost:6379/0"
    #: SQLAlchemy URL of the results store.
    database_url: str = "sqlite:///bertstream.db"
    #: ``default`` (the bundled sentiment model) or a Hugging Face
    #: sequence-classification model directory.
    model: str = DEFAULT_MODEL
    #: Where the bundled model is assembled and cached.
    cache_dir: str = dataclasses.field(default_factory=_default_cache_dir)
    #: Queue family name; lanes are ``<queue>.interactive`` and ``<queue>.bulk``. Letters,
    #: digits, ``.``, ``_`` and ``-`` (:data:`QUEUE_NAME_PATTERN`). A queue ``<q>-<name>``
    #: is the family of model ``<name>`` of queue ``<q>`` (``model_name``): deployments
    #: sharing a Redis database need names where neither is the other's followed by ``-``.
    queue: str = DEFAULT_QUEUE
    #: A named model's tasks: producers send to, and a worker serves, the queue
    #: family ``<queue>-<name>``, and rows are stored under the name. Empty
    #: (or ``default``, read as empty): the default model (rows under the model's
    #: own name).
    model_name: str = ""
    #: ``auto`` (cuda:0 when available, else cpu), ``cpu`` or ``cuda:N``.
    device: str = "auto"
    #: ``auto`` (fp16 on CUDA, fp32 on CPU), ``float32``, ``float16``, ``bfloat16``, or
    #: ``int8`` (dynamic int8 on CPU).
    dtype: str = "auto"
    #: Torch intra-op threads on CPU; 0 lets torch decide (at most :data:`MAX_TORCH_THREADS`).
    torch_threads: int = 0

    # -- input limits (enforced by the producer and again by the worker) --
    #: Longest text accepted, in characters.
    max_text_chars: int = 20_000
    #: Largest ``meta`` object accepted, in bytes of JSON.
    max_meta_bytes: int = 8_192
    #: Longest id / source tag accepted, in characters (at most the column's
    #: 128: a larger value is refused at start).
    max_id_chars: int = ID_COLUMN_CHARS
    #: Texts per broker message when submitting in bulk.
    bulk_chunk_size: int = 256

    # -- micro-batching (worker) --
    #: Longest a request waits in the buffer before a flush, in milliseconds
    #: (1 to a day).
    max_wait_ms: int = 20
    #: Tokens (padded length x rows) one model batch may hold.
    token_budget: int = 8_192
    #: Most texts in one model batch whatever their length.
    max_batch_size: int = 256
    #: Buffered messages that force a flush.
    flush_every: int = 64
    #: Most padding a model batch may carry, as a fraction of its real tokens
    #: (0.10: at most 10% padded tokens); a batch is cut earlier rather than
    #: padded more. Raise it on a GPU, where fewer, larger batches can pay.
    max_padding: float = 0.10
    #: Token cut-off; 0 means the model's own maximum, at most 8192 (the runner's
    #: LONGEST_DEFAULT); a value up to the model's maximum takes more.
    max_length: int = 0
    #: What happens to a text longer than ``max_length`` tokens: ``chunk``
    #: scores it whole in windows cut at sentence boundaries; ``truncate``
    #: scores its first ``max_length`` tokens only.
    long_texts: str = "chunk"
    #: Milliseconds one flush may spend on windows of long texts, estimated
    #: from the worker's measured speed (at least one window per flush); the
    #: rest wait for the next flushes, so short texts arriving meanwhile are
    #: not held up behind a long text. 0: every window in the flush that
    #: received its text.
    window_slice_ms: int = 200
    #: Neutral band: a text whose (calibrated) top probability is below this
    #: is labelled ``neutral``; 0 turns the band off.
    neutral_below: float = 0.0
    #: Deliveries of one task before it is dead-lettered as failed.
    max_attempts: int = 3
    #: Seconds before the unacked messages of a dead worker are redelivered
    #: (kombu's Redis visibility timeout); longer than any flush can take.
    visibility_timeout_s: int = 300
    #: Workers take a message off Redis and record it as unacked in one atomic
    #: step (a Lua script; Redis >= 6.2). Off: kombu's ``BRPOP``, for a
    #: Redis-compatible server without scripting or ``BLMOVE``; a message
    #: that arrives while a worker flushes is then lost if the worker dies.
    atomic_receive: bool = True

    #: Let Celery's remote control (ping, shutdown, ...) reach the workers.
    #: Off: any client of the Redis could otherwise broadcast ``shutdown``.
    remote_control: bool = False

    # -- timeouts (database and Redis, both sides) --
    #: Seconds to establish a database connection (PostgreSQL connect_timeout;
    #: SQLite waits for a locked file up to ``db_statement_timeout_s``).
    db_connect_timeout_s: float = 10.0
    #: Seconds one database operation may take: PostgreSQL's statement_timeout,
    #: and a client-side guard that cuts a connection whose server went silent.
    db_statement_timeout_s: float = 30.0
    #: TCP keepalive idle seconds on database connections (0: the OS default).
    db_keepalive_s: int = 30
    #: Seconds a Redis command may wait for its reply (this and the next two: at
    #: most :data:`MAX_DURATION_S`).
    redis_socket_timeout_s: float = 10.0
    #: Seconds to establish a Redis connection.
    redis_connect_timeout_s: float = 5.0
    #: Seconds between health checks (PING) of an idle Redis connection.
    redis_health_check_s: int = 25
    #: Seconds a starting worker keeps trying to reach Redis (a line logged per try)
    #: before it exits 3; 0: one try. A worker that lost Redis later reconnects for
    #: as long as it takes.
    broker_start_wait_s: float = 60.0

    # -- producer --
    #: Retries of a publish while Redis is unreachable, the pause growing by
    #: 0.25 s per retry up to ``publish_retry_max_s``; then the submit fails.
    publish_retries: int = 8
    #: Longest pause between two publish retries, in seconds (at most a day).
    publish_retry_max_s: float = 2.0
    #: Stream backpressure: pause while the queue holds more messages than this.
    max_queue_length: int = 2_000
    #: Store the text itself next to its hash (off for privacy-sensitive data).
    store_text: bool = True

    #: Port a worker serves its Prometheus metrics on (0: not served). The
    #: launcher gives its children consecutive ports from this one.
    metrics_port: int = 0
    #: Address a worker serves its metrics on (:meth:`_validate_metrics_host`): an IPv4 or
    #: IPv6 address (``127.0.0.1``, ``::1``) or a host name, which the worker resolves at
    #: start and binds the first address of. ``0.0.0.0`` (the default): every IPv4
    #: interface; ``::``: every interface.
    metrics_host: str = "0.0.0.0"  # noqa: S104 - all interfaces, as before the setting

    # -- HTTP API (bertstream serve) --
    #: Bearer tokens the API accepts, comma-separated (a secret: from the environment only).
    api_tokens: str = ""
    #: Origins allowed by CORS, comma-separated (``*`` for any); empty: no CORS headers.
    api_cors_origins: str = ""
    #: Largest request body accepted, in bytes.
    api_max_body_bytes: int = 8_388_608
    #: Most items in one bulk POST.
    api_max_items: int = 1_000
    #: Single-text submits arriving within this many milliseconds share one message
    #: (at most :data:`MAX_API_COALESCE_MS`).
    api_coalesce_ms: int = 5
    #: Longest ``?wait=`` a status request may long-poll, in seconds (at most a day).
    api_max_wait_s: int = 30
    #: How long the API remembers an accepted id (its status ``queued`` and
    #: the text it was submitted with), in seconds (at most :data:`MAX_API_ID_TTL_S`).
    api_id_ttl_s: int = 604_800
    #: Named models the API submits to, comma-separated (at most :data:`MAX_API_MODELS`
    #: model names). Empty: the default model, and a named model while a live worker
    #: serves it (its heartbeats); listed: those and the default model, live workers or
    #: not (producers may submit before the workers start); ``*``: any name. A name no
    #: worker consumes was accepted and stayed ``queued`` for good, its lane left in Redis.
    api_models: str = ""

    def __post_init__(self) -> None:
        # "default" is the default model, as `worker --model default=PATH` reads it: a
        # producer naming it sent to <queue>-default, which no worker serves.
        object.__setattr__(self, "model_name", served_name(self.model_name))

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from ``BERTSTREAM_*`` variables, then apply ``overrides``.

        Raises :class:`ConfigError` naming the variable when a value does not parse.
        """
        source = os.environ if env is None else env
        _name_unknown(source)
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in source:
                values[f.name] = _parse(key, source[key], f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise :class:`ConfigError` when a value is out of range."""
        positive = (
            "max_text_chars", "max_meta_bytes", "max_id_chars", "bulk_chunk_size",
            "token_budget", "max_batch_size", "flush_every", "max_attempts",
            "max_queue_length", "visibility_timeout_s", "db_connect_timeout_s",
            "db_statement_timeout_s", "redis_socket_timeout_s", "redis_connect_timeout_s",
            "api_max_body_bytes", "api_max_items", "api_max_wait_s", "api_id_ttl_s",
        )
        for name in positive:
            value = getattr(self, name)
            if not 0 < value < math.inf:  # NaN too
                # inf and nan are past the upper bound, not below the lower one: the
                # message names the whole range.
                said = _range_said(name, "> 0")
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be "
                                  f"{'finite and ' if said == '> 0' and value > 0 else ''}"
                                  f"{said} (got {_got(value)})")
        self._validate_broker_url()
        self._validate_database_url()
        if self.max_id_chars > ID_COLUMN_CHARS:
            raise ConfigError(
                f"{ENV_PREFIX}MAX_ID_CHARS={self.max_id_chars} is larger than the id and "
                f"source columns ({ID_COLUMN_CHARS} characters)")
        if not 0 <= self.neutral_below <= 1:
            raise ConfigError(f"{ENV_PREFIX}NEUTRAL_BELOW must be between 0 and 1 "
                              f"(got {_got(self.neutral_below)})")
        if not self.max_padding >= 0:
            raise ConfigError(f"{ENV_PREFIX}MAX_PADDING must be >= 0 "
                              f"(got {_got(self.max_padding)})")
        self._validate_ranges()
        for name in ("max_length", "torch_threads", "db_keepalive_s",
                     "redis_health_check_s", "publish_retries", "publish_retry_max_s",
                     "api_coalesce_ms", "metrics_port", "window_slice_ms",
                     "broker_start_wait_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be "
                                  f"{_range_said(name, '>= 0')} (got {_got(value)})")
        self._validate_names()
        self._validate_metrics_host()
        self._validate_api_models()
        if self.long_texts not in LONG_TEXT_MODES:
            raise ConfigError(f"{ENV_PREFIX}LONG_TEXTS: expected one of "
                              f"{', '.join(LONG_TEXT_MODES)} (got {self.long_texts!r})")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "int8"):
            raise ConfigError(f"{ENV_PREFIX}DTYPE: unknown dtype {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"{ENV_PREFIX}DEVICE: expected auto, cpu or cuda:N")

    def _validate_broker_url(self) -> None:
        """Redis or memory://: any other URL (an empty one included) failed deep inside
        redis-py or kombu, with a traceback, in whatever command first used it; so did a
        Redis URL that does not parse (:func:`redis_url_problem`)."""
        if not self.broker_url.startswith((*REDIS_SCHEMES, MEMORY_BROKER)):
            raise ConfigError(
                f"{ENV_PREFIX}BROKER_URL={quoted(mask_url(self.broker_url), _SHOWN_CHARS)} is not a Redis URL "
                f"({', '.join(REDIS_SCHEMES)}) nor {MEMORY_BROKER} (one process)")
        problem = redis_url_problem(self.broker_url)
        if problem:
            raise ConfigError(f"{ENV_PREFIX}BROKER_URL={quoted(mask_url(self.broker_url), _SHOWN_CHARS)} "
                              f"cannot be parsed: {problem}")

    def _validate_database_url(self) -> None:
        """A PostgreSQL URL's port: one past 65535 (or 0) was taken, and psycopg's refusal
        when it connected read as the database being unreachable (exit 3); and an '@' left
        unencoded in its password (:func:`_password_cut_at_an_at`). Anything else that does
        not parse is refused where the URL is opened (contract.results)."""
        scheme, sep, rest = self.database_url.partition("://")
        if not sep or scheme.split("+", 1)[0].lower() not in _TCP_DATABASE_SCHEMES:
            return
        if _password_cut_at_an_at(rest):
            raise ConfigError(f"{ENV_PREFIX}DATABASE_URL={mask_url(self.database_url)}: an '@' "
                              "in the password must be written %40 (percent-encoded)")
        hostport = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        port = re.fullmatch(r"(?:\[[^\]]*\]|[^:\[\],]*):(\d+)", hostport)
        if port and not 0 < int(port.group(1)) <= MAX_PORT:
            raise ConfigError(f"{ENV_PREFIX}DATABASE_URL={mask_url(self.database_url)}: port "
                              f"{quoted(port.group(1), _SHOWN_CHARS)} is not a TCP port (1 to {MAX_PORT})")

    def _validate_names(self) -> None:
        """The queue and model names, which go into Redis keys and kombu's names
        (:data:`QUEUE_NAME_PATTERN`, :data:`MODEL_NAME_PATTERN`); a refused value is
        quoted escaped and cut (:func:`_shown`), so the error stays one short line."""
        if not re.fullmatch(QUEUE_NAME_PATTERN, self.queue):
            raise ConfigError(f"{ENV_PREFIX}QUEUE={quoted(self.queue, _SHOWN_CHARS)}: a queue name is "
                              f"letters, digits, '.', '_' and '-' (at most {MAX_QUEUE_CHARS}, "
                              "starting with a letter or digit)")
        if self.model_name and not re.fullmatch(MODEL_NAME_PATTERN, self.model_name):
            raise ConfigError(f"{ENV_PREFIX}MODEL_NAME={quoted(self.model_name, _SHOWN_CHARS)}: a model name "
                              "is letters, digits, '.', '_' and '-' (at most 100, starting with "
                              "a letter or digit)")

    def _validate_metrics_host(self) -> None:
        """``metrics_host``: an IP address (IPv6 without brackets, neither link-local nor
        with a zone: ``fe80::1%eth0`` cannot be bound) or a host name
        (:data:`_HOST_NAME_PATTERN`, dotted labels not all digits at the end); a name is resolved when the worker binds
        (:meth:`worker.metrics.WorkerMetrics.serve`), not here."""
        host = self.metrics_host
        key = f"{ENV_PREFIX}METRICS_HOST"
        if not host:
            raise ConfigError(f"{key} is empty: give an IP address or a host name "
                              "(0.0.0.0: every IPv4 interface, '::': every interface)")
        shown = quoted(host, _SHOWN_CHARS)
        bracketed = re.fullmatch(r"\[([^\]]*)\](?::\d*)?", host)
        if bracketed:
            raise ConfigError(f"{key}={shown}: write an IPv6 address without brackets "
                              f"({bracketed.group(1) or '::1'}), and the port as "
                              f"{ENV_PREFIX}METRICS_PORT")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            # prometheus_client binds (address, port), the scope id dropped: a zone is
            # lost, and a link-local address fails to bind (EINVAL).
            if isinstance(address, ipaddress.IPv6Address) and (
                    address.scope_id is not None or address.is_link_local):
                raise ConfigError(f"{key}={shown}: a link-local IPv6 address or one with a "
                                  "zone (%...) cannot be served on; give another address "
                                  "of this host, or '::' (every interface)")
            return
        if re.fullmatch(r"[^:]+:\d*", host):
            raise ConfigError(f"{key}={shown}: give the address alone; the port is "
                              f"{ENV_PREFIX}METRICS_PORT")
        if ":" in host or not re.fullmatch(_HOST_NAME_PATTERN, host) \
                or host.rstrip(".").rpartition(".")[2].isdigit():
            raise ConfigError(f"{key}={shown} is neither an IP address (IPv4 or IPv6) "
                              "nor a host name")

    def _validate_api_models(self) -> None:
        """``api_models``: model names (:data:`MODEL_NAME_PATTERN`, at most
        :data:`MAX_API_MODELS`), or ``*`` alone."""
        names = self.api_model_list()
        key = f"{ENV_PREFIX}API_MODELS"
        if API_MODELS_ANY in names and len(names) > 1:
            raise ConfigError(f"{key}: {API_MODELS_ANY} (any model name) stands alone, not in "
                              "a list of names")
        if len(names) > MAX_API_MODELS:
            raise ConfigError(f"{key} lists {len(names)} models, over the limit of "
                              f"{MAX_API_MODELS} (or {API_MODELS_ANY} for any name)")
        for name in names:
            if name != API_MODELS_ANY and not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ConfigError(f"{key}: {quoted(name, _SHOWN_CHARS)} is no model name: "
                                  "letters, digits, '.', '_' and '-' (at most 100, starting "
                                  "with a letter or digit), comma-separated")

    def _validate_ranges(self) -> None:
        """Bounds beyond the sign: values the flush timer, a TCP port, libpq, the socket layer,
        torch and Redis expiries can take."""
        if not self.max_wait_ms >= 1:  # a 0 ms flush timer never fires: a lone text waits
            raise ConfigError(f"{ENV_PREFIX}MAX_WAIT_MS must be >= 1 (got {self.max_wait_ms})")
        if not 0 <= self.metrics_port <= MAX_PORT:
            raise ConfigError(f"{ENV_PREFIX}METRICS_PORT must be between 0 (off) and {MAX_PORT} "
                              f"(got {self.metrics_port})")
        # PostgreSQL takes statement_timeout (and the guard's tcp_user_timeout,
        # a little later) in int32 milliseconds; below 1 ms it would round to 0,
        # which PostgreSQL reads as no limit at all.
        if not MIN_DB_STATEMENT_TIMEOUT_S <= self.db_statement_timeout_s \
                <= MAX_DB_STATEMENT_TIMEOUT_S:
            raise ConfigError(
                f"{ENV_PREFIX}DB_STATEMENT_TIMEOUT_S must be between "
                f"{MIN_DB_STATEMENT_TIMEOUT_S} and {MAX_DB_STATEMENT_TIMEOUT_S} seconds "
                f"(got {self.db_statement_timeout_s})")
        if not self.db_connect_timeout_s <= _INT32_MAX:
            raise ConfigError(f"{ENV_PREFIX}DB_CONNECT_TIMEOUT_S must be at most "
                              f"{_INT32_MAX} seconds (got {self.db_connect_timeout_s})")
        if not 0 <= self.db_keepalive_s <= MAX_DB_KEEPALIVE_S:
            raise ConfigError(f"{ENV_PREFIX}DB_KEEPALIVE_S must be between 0 (the OS default) "
                              f"and {MAX_DB_KEEPALIVE_S} (got {self.db_keepalive_s})")
        # Larger values were taken, then overflowed where they were used (a traceback
        # at the first connection or when the model loaded, Redis refusing every
        # expiry) or held a text or a request for good. NaN fails here too.
        for name, (lowest, most, unit) in _UPPER_BOUNDS.items():
            value = getattr(self, name)
            if not value <= most:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be {lowest} and at most "
                                  f"{most}{unit} (got {_got(value)})")

    @property
    def family(self) -> str:
        """The queue family this model's tasks travel on (see ``model_name``)."""
        return model_family(self.queue, self.model_name)

    def public(self) -> dict[str, Any]:
        """The settings as a dict with passwords in URLs masked, for display."""
        out = dataclasses.asdict(self)
        for key in ("broker_url", "database_url"):
            out[key] = mask_url(out[key])
        if out["api_tokens"]:
            out["api_tokens"] = "***"
        return out

    def token_list(self) -> list[str]:
        """The API's bearer tokens (empty: no tokens configured)."""
        return [t.strip() for t in self.api_tokens.split(",") if t.strip()]

    def api_model_list(self) -> list[str]:
        """The names ``api_models`` lists (empty: none, live workers decide;
        ``[API_MODELS_ANY]``: any name)."""
        return [m.strip() for m in self.api_models.split(",") if m.strip()]


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: the one in its credentials and the
    value of every query parameter whose name contains ``password``
    (``?password=``, ``&sslpassword=``)."""
    url = _PASSWORD_PARAM.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def redis_url_problem(url: str) -> str | None:
    """What is wrong with the Redis URL ``url`` (``redis://``, ``rediss://``, ``unix://``),
    as an error message says it; None when redis-py and Celery's Redis transport can both
    use it. Checked here, once: kombu refused a database index that is not a number (a
    traceback), redis-py silently used database 0 for one, and a ``?db=`` that redis-py
    reads made kombu fail."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a bracketed IPv6 host left open
        return str(exc)
    query = parse_qsl(parts.query, keep_blank_values=True)
    try:
        port = parts.port
    except ValueError:
        raw = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        return f"port {quoted(raw, _SHOWN_CHARS)} is not a TCP port (1 to {MAX_PORT})"
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix:// URL names the socket's path (unix:///run/redis.sock?db=N)"
        dbs = [value for key, value in query if key == "db"]
        others = sorted({key for key, _ in query if key != "db"})
        if others:
            return (f"unix:// takes the database index as ?db=N and no other parameter "
                    f"(got {', '.join(quoted(k, _SHOWN_CHARS) for k in others)})")
        if len(dbs) > 1:
            return "?db= is given more than once"
        return _db_problem(dbs[0], "?db=") if dbs else None
    if port == 0:
        return f"port 0 is not a TCP port (1 to {MAX_PORT})"
    for key, _ in query:
        if key == "db":
            return ("give the database index in the path (redis://HOST:PORT/N), "
                    "not as ?db=, which Celery's Redis transport refuses")
        if not key.startswith("ssl_") and key not in _KOMBU_URL_PARAMS:
            return (f"query parameter {quoted(key, _SHOWN_CHARS)} is not one Celery's Redis transport "
                    "takes (ssl_* and a few of its own)")
    path = parts.path.removeprefix("/")
    return _db_problem(path, "the path") if path else None


def _db_problem(raw: str, where: str) -> str | None:
    """What is wrong with ``raw`` as a Redis database index given in ``where``."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_REDIS_DB:
        return (f"the database index in {where} must be a whole number from 0 "
                f"(got {quoted(raw, _SHOWN_CHARS)})")
    return None


def _range_said(name: str, lowest: str) -> str:
    """The range of the numeric setting ``name`` as an error message says it, whose
    lower bound is ``lowest`` (``> 0``) unless :data:`_UPPER_BOUNDS` says it."""
    if name in _UPPER_BOUNDS:
        low, most, unit = _UPPER_BOUNDS[name]
        return f"{low} and at most {most}{unit}"
    if name == "db_statement_timeout_s":
        return (f"between {MIN_DB_STATEMENT_TIMEOUT_S} and {MAX_DB_STATEMENT_TIMEOUT_S} "
                "seconds")
    if name == "db_connect_timeout_s":
        return f"{lowest} and at most {_INT32_MAX} seconds"
    if name == "db_keepalive_s":
        return f"between 0 (the OS default) and {MAX_DB_KEEPALIVE_S}"
    return lowest


def _got(value: Any) -> str:
    """A refused number as an error message shows it; NaN is said to be no number."""
    if isinstance(value, float) and math.isnan(value):
        return "nan: not a number"
    return str(value)


_PASSWORD_PARAM = re.compile(r"([?&;][^=&;#]*password[^=&;#]*=)[^&;#]*", re.IGNORECASE)


log = logging.getLogger(__name__)

#: ``BERTSTREAM_*`` names that are no setting but are read for themselves: the variables
#: docker-compose.yml substitutes, and the test suite's own.
NOT_SETTINGS = frozenset(ENV_PREFIX + n for n in (
    "IMAGE", "GPU_IMAGE", "GPUS", "PROCS_PER_GPU", "API_WORKERS"))
NOT_SETTINGS_PREFIXES = (ENV_PREFIX + "TEST_",)
#: Names other tools use for what a setting holds, and that setting.
_MEANT = {"REDIS_URL": "BROKER_URL", "CELERY_BROKER_URL": "BROKER_URL", "BROKER": "BROKER_URL",
          "DB_URL": "DATABASE_URL", "DATABASE": "DATABASE_URL", "POSTGRES_URL": "DATABASE_URL",
          "SQLALCHEMY_DATABASE_URI": "DATABASE_URL", "NAME": "MODEL_NAME"}
#: The unknown names already named in this process (each once, however many Settings).
_named_unknown: set[str] = set()


def _name_unknown(source: Mapping[str, str]) -> None:
    """Warn, once per process, of each ``BERTSTREAM_*`` variable that is no setting, with
    the one it most likely meant: ignored without a word, a ``BERTSTREAM_REDIS_URL``
    left the command on the default Redis (database 0 on localhost), another queue."""
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    for key in source:
        if (not key.startswith(ENV_PREFIX) or key in known or key in NOT_SETTINGS
                or key.startswith(NOT_SETTINGS_PREFIXES) or key in _named_unknown):
            continue
        _named_unknown.add(key)
        rest = key[len(ENV_PREFIX):]
        guess = _MEANT.get(rest)
        if guess is None:
            close = difflib.get_close_matches(
                rest, [k[len(ENV_PREFIX):] for k in sorted(known)], n=1, cutoff=0.7)
            guess = close[0] if close else None
        hint = f" (did you mean {ENV_PREFIX}{guess}?)" if guess else ""
        log.warning("%s is no bertstream setting and is ignored%s", key, hint)


def _parse(key: str, raw: str, type_name: Any) -> Any:
    name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    try:
        if name == "int":
            return int(raw)
        if name == "float":
            return float(raw)
        if name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return raw
    except ValueError as exc:
        raise ConfigError(f"{key}={raw!r} is not a valid {name}") from exc


def _password_cut_at_an_at(rest: str) -> bool:
    """Whether the part of a database URL after its ``scheme://`` holds a password cut
    at an unencoded '@': SQLAlchemy reads the password up to its first '@' (the user may
    hold one), and the rest of it became the host (``u:p@ss@host/db``: the host
    ``ss@host``, whose failed look-up printed it as an outage), the database name
    (``u:s3cr@h/t0p@host/db``: a database ``t0p@host/db``, named in the error) or the
    query (``u:s3cr@h?x@host/db``, and ``u:s3cr@h?c=d@host/db``, a value ``d@host/db``:
    the host ``h``). A host holding '@', a database name holding '@' and '/', a query
    parameter's name holding '@', or a value whose '@' is followed by a path
    (:data:`_PATH_AFTER_AT`), or by a port where no database was read
    (:data:`_PORT_AFTER_AT`), is no real one; an '@' in a query value
    (``application_name=me@example.org``, ``application_name=svc@host:8000`` after a
    database) is, and so is any in a file path (:data:`_FILE_PARAMETERS`,
    ``sslrootcert=certs/me@corp/ca.pem``). Still taken as SQLAlchemy reads them, for
    no text tells them from real ones: a password cut where no database follows
    (``u:s3cr@h?c=d@host``, ``u:s3cr@h/t0p@host``, ``u:s3cr@h/x?c=d@host:5432``)."""
    # With a password, as SQLAlchemy reads it: the host, the path and the query after it.
    found = re.match(r"[^:/]*:[^@]*@([^/?]*)(?:/([^?]*))?(?:\?(.*))?", rest, re.DOTALL)
    if not found:
        return False
    host, database, query = (part or "" for part in found.groups())
    if "@" in host or "@" in database and "/" in database:
        return True
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if "@" in name:
            return True
        if name in _FILE_PARAMETERS or value.startswith("/"):
            continue  # a file path: '@' and '/' are the directories' own
        if _PATH_AFTER_AT.search(value) or not database and _PORT_AFTER_AT.search(value):
            return True
    return False


#: An '@' in a query value followed by what a URL has after its host: a path or a
#: query (``d@host/db``, ``d@host?x``).
_PATH_AFTER_AT = re.compile(r"@[^/?]*[/?]")

#: An '@' in a query value followed by a port that ends it (``d@host:5432``): what a URL
#: without a database has after its host; after a database, a value such as
#: ``application_name=svc@host:8000``.
_PORT_AFTER_AT = re.compile(r"@[^/?]*:\d+$")

#: libpq's parameters that name a file, whose value is a path (relative or absolute,
#: Windows' ``C:/Users/me@corp/...`` too) and may hold '@' and '/'.
_FILE_PARAMETERS = frozenset({"passfile", "sslcert", "sslkey", "sslrootcert", "sslcrl",
                              "sslcrldir", "sslkeylogfile"})
