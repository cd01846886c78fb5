"""The one settings object. Every field reads from an environment variable `TRANSFER_<NAME>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# What pydantic reads as a bool, for TRANSFER_COMPILE's old bool spellings.
_BOOL_SPELLINGS = {
    "1": "true",
    "yes": "true",
    "on": "true",
    "0": "false",
    "no": "false",
    "off": "false",
}


def _default_weights_dir() -> Path:
    # torchvision's own cache layout, so weights fetched by torchvision are found as they are.
    import os

    torch_home = os.environ.get("TORCH_HOME", str(Path.home() / ".cache" / "torch"))
    return Path(torch_home) / "hub" / "checkpoints"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRANSFER_", extra="ignore")

    host: str = Field(
        "127.0.0.1",
        description="Interface the gRPC server binds to; 0.0.0.0 to accept remote clients.",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9090, ge=-1, le=65535, description="Prometheus /metrics HTTP port; 0 picks one, -1 off."
    )
    store_dir: Path = Field(
        Path("var/store"), description="Directory of the durable store (heads, jobs, datasets)."
    )
    recreate_database: bool = Field(
        False,
        description="Start with an empty database when store.sqlite3 is missing or empty while "
        "heads are stored (the server refuses to start otherwise: their jobs and datasets "
        "would be gone without a word). The heads stay usable.",
    )
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:password@host:port/db) of the store "
        "that several replicas share: heads, jobs, datasets. Its schema is migrated at start. "
        "Unset: the embedded store in TRANSFER_STORE_DIR.",
    )
    job_lease_seconds: float = Field(
        30.0,
        ge=3.0,
        le=120.0,
        description="A server renews the lease on the jobs it runs every third of this; a "
        "job whose lease ran out (its server stopped without ending it) is claimed by "
        "another replica and runs again from the start. Keep replicas' clocks in sync (NTP).",
    )
    job_retention_seconds: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="Finished jobs and their events are deleted this long after they finished "
        "(checked at start, then hourly or every retention period if shorter); 0 keeps them "
        "forever. Queued and running jobs, and heads, are never deleted.",
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Frozen-trunk compute precision. 'auto': measured at each backbone's load: "
        "fp32, bf16 (and fp16 on CUDA) are checked against fp32 on the shipped calibration "
        "set (pooled-feature cosine >= 0.99 mean, 0.98 min) and timed at batch 1 and 8; "
        "Predict runs the fastest that passes, training stays fp32; the choice is kept in "
        "the store per machine fingerprint. An explicit value forces it for Predict and "
        "training. Heads always run in fp32.",
    )
    compile: Literal["auto", "true", "false"] = Field(
        "auto",
        description="torch.compile of each loaded backbone's frozen stages. 'auto': after "
        "SERVING, one low-priority background thread builds faster candidates (compiled "
        "stages; int8 stages on a CPU for image backbones under TRANSFER_PRECISION=auto), "
        "checks each "
        "against fp32 on the calibration set, times it against the serving path and swaps in "
        "the fastest that is >= 5% faster; the verdict is kept in the store per machine "
        "fingerprint. 'true': compiled at load, warmed up at batch sizes 1, 2 and 16 (a "
        "slower load, minutes on a small CPU; a compile failure fails the load). 'false': "
        "eager only.",
    )
    weights_dir: Path = Field(
        default_factory=_default_weights_dir,
        description="torchvision-layout weights directory for the ResNet/MobileNet backbones.",
    )
    preload_backbones: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["efficientnet_lite0", "minilm_l6"],
        description="Comma-separated backbones loaded and warmed before health is SERVING.",
    )
    backbone_cache_bytes: int = Field(
        4 * 1024**3, gt=0, description="Resident-bytes budget of the backbone cache (LRU)."
    )
    head_cache_entries: int = Field(
        256, gt=0, description="Most heads kept loaded (LRU), a bound besides head_cache_bytes."
    )
    head_cache_bytes: int = Field(
        1024**3,
        gt=0,
        description="Resident-bytes budget of the head cache (LRU; each head's parameters and "
        "buffers on its device). A head larger than the whole budget is still served, just "
        "not kept.",
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=1024,
        description="Override every image backbone's input side in pixels (smaller is faster).",
    )
    max_text_tokens: int = Field(256, ge=8, le=512, description="Text inputs are cut here.")
    max_message_bytes: int = Field(
        64 * 1024**2, gt=0, description="Largest gRPC message accepted or sent."
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Images declaring more pixels are refused before decoding."
    )
    max_dataset_examples: int = Field(
        100_000, gt=0, description="Most examples in one dataset or FineTune request."
    )
    max_classes: int = Field(
        1000,
        ge=2,
        description="Most classes (distinct labels) one head may have; a FineTune naming more "
        "is RESOURCE_EXHAUSTED before it queues.",
    )
    max_dataset_bytes_per_tenant: int = Field(
        2 * 1024**3,
        gt=0,
        description="Most bytes (images, texts, labels) one tenant's uploaded datasets may "
        "hold; an upload past it is RESOURCE_EXHAUSTED and removed. DeleteDataset frees space.",
    )
    max_predict_inputs: int = Field(512, gt=0, description="Most inputs in one Predict call.")
    batch_max_size: int = Field(
        64, gt=0, description="Most inputs the Predict batcher stacks into one trunk pass."
    )
    max_batch_input_bytes: int = Field(
        1024**3,
        gt=0,
        description="Most bytes of preprocessed input in one trunk pass; a single Predict "
        "over it is RESOURCE_EXHAUSTED (a guard against accelerator out-of-memory).",
    )
    predict_batch_padding: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Pad each Predict batch with copies of its last input up to a power of two "
        "(at most batch_max_size), sizes all run at start-up; 'auto': on with an accelerator, "
        "where each new batch size costs cuDNN plan building, off on a CPU, where padding "
        "costs full compute.",
    )
    predict_slice_ms: float = Field(
        50.0,
        gt=0,
        description="A Predict of more than 8 inputs and more than two slices of compute (at "
        "the last batch's time per input) runs in one-slice chunks, one per batch, so no caller "
        "holds the compute thread much longer; larger: faster large requests, slower small "
        "ones beside them.",
    )
    batch_max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="Longest the batcher holds a batch for requests already being decoded; "
        "with none on the way it runs at once.",
    )
    feature_cache_bytes: int = Field(
        2 * 1024**3, gt=0, description="Largest cached-trunk-output set a training job keeps."
    )
    progress_min_interval_ms: float = Field(
        100.0,
        ge=0,
        description="Mid-epoch training progress events closer together are coalesced "
        "(epoch ends and terminal events always stream).",
    )
    max_running_jobs: int = Field(
        1,
        gt=0,
        description="Training jobs this server runs at once; the rest wait in the queue "
        "(with TRANSFER_DATABASE_URL, for a free slot on any replica).",
    )
    job_max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Runs of one job: a job whose server stopped before it finished runs "
        "again from the start, until this many runs were cut off; then it fails (it may be "
        "what stops the server).",
    )
    max_jobs_per_tenant: int = Field(
        8,
        gt=0,
        description="Jobs one tenant may have queued or running; more are RESOURCE_EXHAUSTED.",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of the Predict compute thread and of a running "
        "training job (every other thread uses one); 0: one per CPU the process may use.",
    )
    training_torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of a running training job. 0: the job yields to "
        "Predict on a CPU (every core while no Predict batch started in the last 0.5 s, half "
        "of them while Predicts come). A count below TRANSFER_TORCH_THREADS fixes the split "
        "for the whole job (steady Predicts, a job alone trains slower); at or above it, the "
        "job and Predict share every core.",
    )
    grace_seconds: float = Field(
        20.0, ge=0, description="On SIGTERM, how long in-flight calls get before the server stops."
    )
    drain_seconds: float = Field(
        1.0,
        ge=0,
        description="On SIGTERM, after health reads NOT_SERVING, how long new calls are still "
        "taken in and answered UNAVAILABLE (not cancelled) before the server stops; part of "
        "TRANSFER_GRACE_SECONDS, at most half of it.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the service's loggers (libraries log from INFO)."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="'json': one JSON object per line (with request_id), for log collectors; "
        "'text' for humans; 'auto': text when stderr is a terminal, else json.",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM server certificate chain; with TRANSFER_TLS_KEY_FILE it turns TLS on.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of the certificate.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed "
        "(mutual TLS).",
    )
    auth_tokens_file: Path | None = Field(
        None,
        description='JSON file {"token": "tenant", ...}; any token configured turns bearer '
        "auth on.",
    )
    tenant_requests_per_second: float | None = Field(
        None,
        ge=0,
        description="Calls one tenant may start a second (a token bucket; 0: no limit; unset: "
        "50 per CPU this process may use, 100 on 2). A call over it waits for its tenant's "
        "next token, up to TRANSFER_TENANT_ADMISSION_HOLD_MS, then is RESOURCE_EXHAUSTED with "
        "a retry-after-ms trailer. Without auth every caller is one tenant.",
    )
    tenant_request_burst: int = Field(
        200, ge=1, description="Calls a tenant may start at once above its rate, after a pause."
    )
    tenant_max_in_flight: int = Field(
        256,
        ge=0,
        description="Unary calls one tenant may have running (0: no bound); more wait, then "
        "are RESOURCE_EXHAUSTED. Streams (FineTune, WatchJob, uploads) are not counted.",
    )
    tenant_admission_hold_ms: float = Field(
        1000.0,
        ge=0,
        description="Longest a call over its tenant's limits is held (a timer, no CPU) before "
        "it is refused: a caller looping on refusals cannot spin faster than this.",
    )
    auth_tokens: SecretStr = Field(
        SecretStr(""),
        description="More bearer tokens as token=tenant pairs, comma-separated. None anywhere: "
        "auth off, every caller is tenant 'default'.",
    )

    @model_validator(mode="after")
    def _tls_files_together(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TRANSFER_TLS_CERT_FILE and TRANSFER_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TRANSFER_TLS_CLIENT_CA_FILE (mutual TLS) needs TLS: set the cert")
        return self

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_spelling(cls, value: object) -> object:
        """The setting was a bool before 'auto': its spellings (1/0, yes/no, on/off) still
        mean 'true'/'false'."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            word = value.strip().lower()
            return _BOOL_SPELLINGS.get(word, word)
        return value

    @field_validator("preload_backbones", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value
