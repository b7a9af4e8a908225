#!/usr/bin/busybox sh
# PID 1 of the VMs of `cargo xtask vm-test` and `vm-shell` (xtask/src/vm/): mounts what the
# lab needs, loads the modules Debian builds as modules (veth, bridge, netfilter), then runs
# the integration tests or a shell, and ends the VM through qemu's isa-debug-exit device.
/usr/bin/busybox --install -s /busybox
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/busybox HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
. /vm/env

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
# /tmp stays on the initramfs itself: a tmpfs there would hide test binaries built under /tmp.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# The open-file limit containers get from their runtime (containerd, podman: 1048576), not
# the kernel's 1024/4096 for PID 1: the proxy sizes its connection caps from it, as in a pod.
ulimit -n 1048576

echo "sidecar-vm: Linux $(uname -r), $(nproc) CPU, $(awk '/MemTotal/ { print $2 / 1024 " MiB" }' /proc/meminfo)"
while IFS= read -r module; do
    insmod "$module" || echo "sidecar-vm: insmod $module failed"
done < /vm/modules.load

# $1: the exit status to report. The host reads this line, then qemu's exit status.
finish() {
    echo "sidecar-vm: result exit=$1"
    /vm/exit-qemu "$(( $1 == 0 ? 0 : 1 ))"
    poweroff -f
}

case " $(cat /proc/cmdline) " in
*" sidecar.mode=shell "*)
    echo "sidecar-vm: the sidecar is on PATH; /vm/run-tests [FILTER] runs the integration tests."
    echo "sidecar-vm: leave with exit (or Ctrl-D); Ctrl-A X kills the VM."
    # cttyhack makes the serial console the shell's controlling terminal (job control, Ctrl-C).
    setsid cttyhack bash -l
    finish 0
    ;;
*)
    # TCG translates code the first time it runs: start the tests' helpers once, so that the
    # first test that times one (a python3 client gets 5 s to connect) does not pay for it.
    python3 -c 'import ctypes, socket' && sidecar --help >/dev/null && ip -V >/dev/null
    /vm/run-tests
    finish $?
    ;;
esac
