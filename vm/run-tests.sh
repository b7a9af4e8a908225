#!/bin/sh
# Runs the integration test executables listed in /vm/tests.list, as `cargo test` would, and
# exits non-zero if any failed. Arguments go to every executable (e.g. a test name filter);
# without any, those given to `cargo xtask vm-test -- ...` (in /vm/test-args) are used.
if [ $# -eq 0 ]; then
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < /vm/test-args
fi
status=0
while IFS= read -r test <&3; do
    echo "sidecar-vm: running ${test##*/} $*"
    "$test" "$@" || status=1
done 3< /vm/tests.list
exit $status
