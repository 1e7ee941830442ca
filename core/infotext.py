"""Reading A1111's infotext: the generation parameters a WebUI writes into each PNG (`parameters`).

The format, as A1111's `parse_generation_parameters` reads it:

    a lighthouse at dusk,
    oil painting
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, ...

Prompt lines come first; a line starting `Negative prompt:` begins the negative
prompt (it may go on over several lines); the last line holds the parameters,
`Key: value` separated by commas, a value JSON-quoted when it holds a comma, a
colon or a newline.  A last line with fewer than three parameters is not a
parameters line but part of the prompt, as in A1111.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType

import attrs

_NEGATIVE = "Negative prompt:"
#: A1111's `re_param`: one `Key: value` of the parameters line.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
#: A1111 treats a last line with fewer parameters than this as a prompt line.
_MIN_PARAMS = 3


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


@attrs.frozen
class Infotext:
    """One image's infotext, taken apart.

    Attributes:
        prompt: The prompt (lines joined with newlines, each stripped).
        negative_prompt: The negative prompt, "" when the text has none.
        params: The parameters line, `{"Steps": "20", "Seed": "1234", ...}`,
            values unquoted but not converted.
    """

    prompt: str
    negative_prompt: str
    params: Mapping[str, str] = attrs.field(converter=lambda params: MappingProxyType(dict(params)))

    @classmethod
    def parse(cls, text: str) -> Infotext:
        """Read an infotext as A1111 does; any text reads as something (at worst, all prompt)."""
        *lines, last = text.strip().split("\n")
        if len(_PARAM.findall(last)) < _MIN_PARAMS:
            lines.append(last)
            last = ""
        prompt: list[str] = []
        negative: list[str] | None = None
        for line in (line.strip() for line in lines):
            if line.startswith(_NEGATIVE):
                negative = negative or []
                line = line[len(_NEGATIVE) :].strip()
            (prompt if negative is None else negative).append(line)
        params = {key: _unquote(value) for key, value in _PARAM.findall(last)}
        return cls("\n".join(prompt), "\n".join(negative or ()), params)

    @property
    def seed(self) -> int | None:
        """The `Seed` parameter when it is a seed A1111 could have used (0 to 2**32 - 1), else None."""
        try:
            seed = int(self.params.get("Seed", ""))
        except ValueError:
            return None
        return seed if 0 <= seed < 2**32 else None
