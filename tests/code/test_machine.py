"""Where a measurement runs, and whether it is emulated (machine.py)."""

from gtsrb import machine


def test_emulation_is_told_by_the_kernel_not_by_uname(monkeypatch):
    """qemu-user answers uname with the guest's architecture and shows an Arm /proc/cpuinfo, but
    /proc/sys/kernel/arch names the host's kernel (both seen in the aarch64 leg)."""
    monkeypatch.delenv("GTSRB_EMULATED", raising=False)
    for arch, kernel, emulated in (
        ("aarch64", "x86_64", True),
        ("aarch64", "aarch64", False),
        ("arm64", "aarch64", False),
        ("x86_64", "x86_64", False),
    ):
        monkeypatch.setattr(machine.platform, "machine", lambda arch=arch: arch)
        monkeypatch.setattr(machine, "kernel_arch", lambda kernel=kernel: kernel)
        assert machine.emulated() is emulated, (arch, kernel)
    monkeypatch.setenv("GTSRB_EMULATED", "1")
    assert machine.emulated() is True
