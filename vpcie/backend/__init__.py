"""The vpcie vhost-user backend: asyncio server, device-neutral core, Device interface."""

from vpcie.backend.device import Device, DeviceHost, NullGpuDevice

__all__ = ["Device", "DeviceHost", "NullGpuDevice"]
