"""ctedge: put a chest-CT COVID-19 classifier onto edge hardware."""

__version__ = "0.1.0"
