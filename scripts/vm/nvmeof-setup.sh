#!/usr/bin/env bash
# Run INSIDE the guest: creates kernel NVMe-oF targets (nvmet, configfs), each a subsystem with one
# file-backed namespace on tmpfs, as demo-nvmeof.sh does, but leaves them up for the engine.
#   nvmeof-setup.sh <trtype> <traddr> <port> <nqn> <backing file> <size>
# e.g. nvmeof-setup.sh tcp 127.0.0.1 4420 nqn.2026-11.io.test:tcp /tmp/ns-tcp.img 256M
set -eu
tr=$1 addr=$2 port=$3 nqn=$4 file=$5 size=$6
modprobe -a nvmet nvmet-tcp nvmet-rdma nvme-tcp nvme-rdma nvme-fabrics
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
CFG=/sys/kernel/config/nvmet
truncate -s "$size" "$file"
mkdir "$CFG/subsystems/$nqn"
echo 1 > "$CFG/subsystems/$nqn/attr_allow_any_host"
mkdir "$CFG/subsystems/$nqn/namespaces/1"
echo "$file" > "$CFG/subsystems/$nqn/namespaces/1/device_path"
# tmpfs has no O_DIRECT: the target must use the page cache for its backing file.
echo 1 > "$CFG/subsystems/$nqn/namespaces/1/buffered_io"
echo 1 > "$CFG/subsystems/$nqn/namespaces/1/enable"
id=$(( $(ls "$CFG/ports" | wc -l) + 1 ))
mkdir "$CFG/ports/$id"
echo "$addr" > "$CFG/ports/$id/addr_traddr"
echo "$tr" > "$CFG/ports/$id/addr_trtype"
echo "$port" > "$CFG/ports/$id/addr_trsvcid"
echo ipv4 > "$CFG/ports/$id/addr_adrfam"
ln -s "$CFG/subsystems/$nqn" "$CFG/ports/$id/subsystems/$nqn"
echo "nvmet: $nqn on $tr $addr:$port backed by $file ($size)"
