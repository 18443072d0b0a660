"""Error types of the engine.

Every problem a user can cause (a bad file, a wrong model, a bad option) is raised as a
:class:`LoraXError` subclass whose message names the file or input and says what is wrong and,
where possible, what to do. Callers (command line, ComfyUI nodes) show ``str(err)`` and nothing else.
"""
from __future__ import annotations


class LoraXError(Exception):
    """Base class of every error the pack raises on purpose."""


class LoraFileError(LoraXError):
    """A LoRA or checkpoint file cannot be read or is not what it claims to be."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ArchitectureError(LoraXError):
    """A model or LoRA is of the wrong architecture for the requested operation."""


class IncompatibleLoraError(LoraXError):
    """A LoRA does not fit the base model it is used with (names or shapes)."""


class OutputPathError(LoraXError):
    """An output name or folder is unsafe or cannot be written."""


class TransferOptionError(LoraXError):
    """An option of the transfer is out of range or unknown."""
