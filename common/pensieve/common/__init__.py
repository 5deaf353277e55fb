"""Helpers shared by the engine, the router and the operator.

Standard library only: the router and the operator import this package, and
they never import torch. Each module owns one concept:

- ``quantity``: Kubernetes quantities ("64Gi", "1.5G", "500m") and byte counts;
- ``memory``: how much of a memory budget the CPU tier of the KV cache may take;
- ``flags``: a dataclass -> command-line flags and environment variables.
"""
