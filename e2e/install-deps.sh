#!/usr/bin/env bash
# Installs what Sendense's demo and tests need on a fresh Debian bookworm machine of this kind,
# skipping whatever is already there. Go-built tools (the control plane, kubelet, kube-proxy)
# are built separately, into the cache, by e2e/cluster/build.sh. The real node needs containerd
# (1.6, CRI v1), runc, the CNI plugins, nftables (kube-proxy's mode) and conntrack; its tests
# make a small image from busybox-static. File-level restore's tests build populated guest file
# systems with the real tools, without mounting (e2fsprogs, xfsprogs, ntfs-3g, gdisk, fdisk).
# `make bench` compares the network cases with iperf3's goodput.
set -euo pipefail
need=()
for tool in curl:curl openssl:openssl pgrep:procps setsid:util-linux \
    qemu-img:qemu-utils qemu-nbd:qemu-utils nbdkit:nbdkit nbdcopy:libnbd-bin nbdinfo:libnbd-bin python3:python3 \
    ip:iproute2 tc:iproute2 /usr/bin/time:time promtool:prometheus iperf3:iperf3 \
    mmdebstrap:mmdebstrap skopeo:skopeo umoci:umoci readelf:binutils \
    containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
    nft:nftables conntrack:conntrack ss:iproute2 sysctl:procps /bin/busybox:busybox-static \
    mke2fs:e2fsprogs mkfs.xfs:xfsprogs mkntfs:ntfs-3g ntfscp:ntfs-3g sgdisk:gdisk sfdisk:fdisk; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
# PyYAML for the chart checks (comparing the PrometheusRule with the plain rule file).
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml 2>/dev/null \
  || { apt-get install -y -qq python3-yaml >/dev/null; }
for tool in go cargo; do
  command -v "$tool" >/dev/null || { echo "$tool is required (see README.md)" >&2; exit 1; }
done
