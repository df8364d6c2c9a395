"""Test harnesses, for the tests, the benchmarks and ``vpcie demo``:
``frontend`` plays QEMU's vhost-user side, ``guest_driver`` models what the
guest kernel's virtio_gpu driver sends, ``guestvm`` boots real QEMU guests.

Nothing in the backend or the agent imports this package."""
