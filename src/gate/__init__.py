"""Gate: an enterprise gateway in front of Anthropic's Messages API."""

__version__ = "0.1.0"
