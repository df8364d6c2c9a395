"""vpcie: network-attached virtual GPUs for QEMU/KVM guests."""

__version__ = "0.1.0"
