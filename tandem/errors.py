"""Exceptions users catch. Every bad-input error is a ValueError, so `except ValueError` works.

Services map these to gRPC status codes in one interceptor (INVALID_ARGUMENT for the bad-input ones,
NOT_FOUND for ModelNotFoundError).
"""
from __future__ import annotations


class TandemError(Exception):
    """Base class of tandem's own errors."""


class InvalidRequestError(TandemError, ValueError):
    """A request's values are out of range: bad sampling parameters, empty or too-long prompt."""


class ModelNotFoundError(InvalidRequestError):
    """A request names a model (or LoRA adapter) this server does not serve (gRPC NOT_FOUND,
    HTTP 404 model_not_found)."""


class ConfigError(TandemError, ValueError):
    """A configuration value (model config, engine config, CLI flag) is invalid."""


class ModelLoadError(TandemError, ValueError):
    """A model could not be found or its file is corrupt, truncated or unsupported."""


class QueueFullError(TandemError):
    """The engine's waiting queue is full: retry later (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class PluginError(TandemError):
    """A plugin failed to load or raised inside a hook; the message names the plugin. The request
    that hit it fails (gRPC INTERNAL, HTTP 500); the engine and the other requests go on."""


class ParallelGroupError(TandemError):
    """A rank of a model split over several processes (tensor / pipeline / expert parallelism)
    failed during a step. The step's requests fail with it (gRPC UNAVAILABLE, HTTP 503: a
    pipeline's gateway moves them to another worker); the group restarts as a whole."""
