"""sdjobs: multi-stage Stable Diffusion jobs against an A1111-compatible WebUI."""

from sdjobs.hookspecs import hookimpl

__all__ = ["hookimpl"]
