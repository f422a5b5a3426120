"""cmlab: a Configuration Manager Updates and Servicing lab."""

__version__ = "0.1.0"
