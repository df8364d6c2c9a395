"""The fleet: glue between the pool (``vpcie.pool``), the agents (their
inventory over the tunnel) and the backends (their control sockets).

Control plane only: nothing here imports the data plane (pyproject's
import-linter contract), so the CLI and the registrar stay light.
"""
