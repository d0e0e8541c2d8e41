"""The one error every unusable setting raises, whatever layer found it.

A flag, environment variable, configuration key or file that derpd cannot use is a
``ConfigurationError`` (or a subclass named after its concern: ``AdmissionError``,
``LimitError``, ``CertError``, ...). ``derpd.cli`` catches this one type and prints
``derpd: error: <message>`` with exit status 2 before anything is started, so the message
must name the setting and say what is wrong in one line.
"""

from __future__ import annotations


class ConfigurationError(Exception):
    """A setting or file that cannot be used; the message names it and says why."""
