"""speechclas: a trainable speech keyword classifier served through DEEPaaS."""

__version__ = "0.1.0"
