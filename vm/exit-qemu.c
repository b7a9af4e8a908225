/* Ends the VM of `cargo xtask vm-test` with a status the host can read: it writes STATUS to
 * qemu's isa-debug-exit device (-device isa-debug-exit,iobase=0xf4,iosize=4), and qemu exits
 * with (STATUS << 1) | 1. Debian kernels have no /dev/port, hence this helper. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>

#define DEBUG_EXIT_PORT 0xf4

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: exit-qemu STATUS\n");
        return 2;
    }
    unsigned int status = (unsigned int)strtoul(argv[1], NULL, 10);
    if (ioperm(DEBUG_EXIT_PORT, 4, 1) != 0) {
        perror("exit-qemu: ioperm");
        return 1;
    }
    outl(status, DEBUG_EXIT_PORT);
    /* Still running: the VM has no isa-debug-exit device. */
    fprintf(stderr, "exit-qemu: no isa-debug-exit device at port 0xf4\n");
    return 1;
}
