#!/usr/bin/env bash
# Builds Sendense's container images as reproducible archives, each at once an OCI image layout
# and a docker-archive (e2e/src/oci/, the oci-image binary), loadable without a registry:
#
#   bash e2e/images/build.sh [pause] [operator] [agent]      # no argument: all three
#
# stdout: exactly one line per image, "<name> <archive-path> <image-reference>"; logs go to
# stderr. Archives: $SENDENSE_CACHE/images/<version>/<profile>/<name>.oci.tar, <version> being the chart's
# appVersion (the image tag). Idempotent: an image is rewritten only when its inputs changed.
#
#   pause     localhost/sendense/pause:3.10 — the real node's containerd sandbox_image: a static
#             Rust pause (e2e/images/pause), user 65535.
#   operator  ghcr.io/sendense/sendense-operator:<version> — the static sendense-operator,
#             /etc/passwd and /etc/group with user 65532, /etc/nsswitch.conf, nothing else.
#   agent     ghcr.io/sendense/sendense-agent:<version> — Debian bookworm (mmdebstrap, variant
#             essential: qemu-utils, nbdkit, libnbd-bin, ca-certificates; no docs, no apt) plus
#             the static /usr/local/bin/sendense-agent; user 65532. The Debian layer is cached
#             in $SENDENSE_CACHE/images/base/<key> (key: packages, mmdebstrap arguments, suite,
#             apt sources), so a code change only repacks the binary layer.
#
# Environment: SENDENSE_IMAGE_PROFILE=release (default) or dev (the Cargo profile of the static
# binaries); SOURCE_DATE_EPOCH (default: the commit time of HEAD) for every timestamp;
# SENDENSE_CACHE, CARGO_TARGET_DIR as elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }

version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/sendense/Chart.yaml)
[ -n "$version" ] || die "no appVersion in charts/sendense/Chart.yaml"
profile=${SENDENSE_IMAGE_PROFILE:-release}
case $profile in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) die "SENDENSE_IMAGE_PROFILE=$profile: expected release or dev" ;;
esac
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Per profile: the test command (dev) and the demo (release) do not overwrite each other's archives.
out=$SENDENSE_CACHE/images/$version/$profile
stage=$out/.stage
mkdir -p "$out"
# The static binaries get their own target triple directory: the host builds (tests, demo)
# stay valid, and RUSTFLAGS do not reach build scripts and proc-macros.
target=x86_64-unknown-linux-gnu

images=("$@")
[ ${#images[@]} -gt 0 ] || images=(pause operator agent)
for name in "${images[@]}"; do
  case $name in pause | operator | agent) ;; *) die "unknown image $name (pause, operator, agent)" ;; esac
done
want() { local n; for n in "${images[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }

# The image writer (host build, dev profile; its hashing and gzip crates are optimised there).
log "building the image writer"
cargo build -q --locked -p sendense-e2e --bin oci-image >&2
oci_image=$CARGO_TARGET_DIR/debug/oci-image
writer_hash=$(find e2e/src/oci e2e/src/bin/oci-image.rs -name "*.rs" -print0 | LC_ALL=C sort -z | xargs -0 cat | sha256sum | cut -c1-16)

# Static binaries: glibc's own static libc (glibc >= 2.34 resolves host names through its
# built-in files and dns sources, no NSS module is loaded); checked to have no interpreter.
static_build() {
  local what=("$@")
  log "building ${what[*]} static ($profile profile)"
  local start=$SECONDS
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_INCREMENTAL=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_STRIP=debuginfo \
    cargo build -q --locked --target "$target" --profile "$profile" "${what[@]}" >&2
  log "  ${what[*]}: $((SECONDS - start)) s"
}
static_bin() {
  local bin=$CARGO_TARGET_DIR/$target/$profile_dir/$1
  [ -x "$bin" ] || die "$bin was not built"
  if grep -q 'program interpreter' <<<"$(readelf -l "$bin")"; then die "$bin is not static"; fi
  echo "$bin"
}

# The reference, labels and user of each image.
pause_ref=localhost/sendense/pause:3.10
operator_ref=ghcr.io/sendense/sendense-operator:$version
agent_ref=ghcr.io/sendense/sendense-agent:$version
labels=(--label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.revision=$revision"
  --label "org.opencontainers.image.licenses=Apache-2.0" --label "org.opencontainers.image.vendor=Sendense")

# /etc of the operator image: its user, and nsswitch.conf with "hosts: files dns", as every
# distribution (and distroless) has it. glibc's documented order without the file is
# "dns [!UNAVAIL=return] files", under which a name DNS denies (a pod's hostAliases) would
# never reach /etc/hosts; on this machine both orders resolved, so the file only makes the
# order explicit. glibc >= 2.34 has the files and dns sources built in, also when linked
# statically: e2e/images/verify.sh resolves a name from /etc/hosts and one from DNS inside
# the image.
etc_files() { # $1: root of a stage directory
  mkdir -p "$1/etc"
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$1/etc/nsswitch.conf"
  chmod 0644 "$1/etc/nsswitch.conf"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nsendense:x:65532:65532:sendense:/nonexistent:/usr/sbin/nologin\n' > "$1/etc/passwd"
  printf 'root:x:0:\nsendense:x:65532:\n' > "$1/etc/group"
  chmod 0644 "$1/etc/passwd" "$1/etc/group"
}

# What a stage directory holds (names, types, modes, link targets, contents), for the keys.
stage_hash() {
  (cd "$1" && find . -printf '%p %y %m %l\n' | LC_ALL=C sort &&
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -c1-64
}

# Writes <name>.oci.tar unless an archive of the same inputs is there (its key file says so).
# $1 name, $2 reference, $3 what the layers hold, rest: oci-image build arguments.
write_image() {
  local name=$1 ref=$2 inputs=$3; shift 3
  local archive=$out/$name.oci.tar
  local key
  key=$(printf '%s\n' "$inputs" "$ref" "$epoch" "$writer_hash" "$*" | sha256sum | cut -c1-64)
  if [ -f "$archive" ] && [ "$(cat "$archive.key" 2>/dev/null)" = "$key" ]; then
    log "$name: up to date ($archive)"
  else
    local start=$SECONDS
    "$oci_image" build --reference "$ref" --out "$archive" --epoch "$epoch" "$@" > "$archive.json"
    echo "$key" > "$archive.key"
    log "$name: wrote $archive in $((SECONDS - start)) s: $(sed 's/.*"manifest":"\([^"]*\)".*"archiveSize":\([0-9]*\),"unpackedSize":\([0-9]*\).*/manifest \1, \2 bytes, \3 unpacked/' "$archive.json")"
  fi
  echo "$name $archive $ref"
}

if want pause; then
  static_build -p sendense-pause
  bin=$(static_bin pause)
  rm -rf "$stage/pause" && mkdir -p "$stage/pause"
  install -m 0755 "$bin" "$stage/pause/pause"
  write_image pause "$pause_ref" "$(stage_hash "$stage/pause")" \
    --layer "dir:$stage/pause" --created-by "sendense pause (e2e/images/pause)" \
    --user 65535:65535 --entrypoint '["/pause"]' "${labels[@]}" \
    --label "org.opencontainers.image.title=sendense-pause"
fi

# Sets base: the directory of the cached Debian layer (layer.json and its blob).
agent_base() {
  # The Debian base: packages, mmdebstrap arguments, suite and apt sources make the cache key.
  local suite=bookworm packages base_epoch sources f mm_args base_key list_hook start
  packages=qemu-utils,nbdkit,libnbd-bin,ca-certificates
  # A fixed time for the base, so its layer does not change with every commit.
  base_epoch=1747699200 # 2025-05-20, the date of the machine's apt snapshot
  sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && sources+=("$f")
  done
  [ ${#sources[@]} -gt 0 ] || die "no apt sources in /etc/apt"
  # merged-usr hook: /usr merged by directory symlinks as debootstrap does, instead of the
  # usrmerge package, which pulls in perl (~20 MB) that nothing in the image uses.
  mm_args=(--variant=essential --include="$packages" --format=tar
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
    # The runtime provides these; the build host's must not get in.
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"'
    # No apt in the image: debconf's backups go here, apt's download directories below.
    --customize-hook='rm -f "$1"/var/cache/debconf/*-old'
    --customize-hook='echo "sendense:x:65532:65532:sendense:/nonexistent:/usr/sbin/nologin" >> "$1/etc/passwd"'
    --customize-hook='echo "sendense:x:65532:" >> "$1/etc/group"')
  base_key=$( { printf '%s\n' "$suite" "$packages" "$base_epoch" "$writer_hash" "${mm_args[@]}" apt-dirs-filtered; cat "${sources[@]}"; } | sha256sum | cut -c1-16)
  base=$SENDENSE_CACHE/images/base/$base_key
  if [ ! -s "$base/layer.json" ]; then
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (bash e2e/install-deps.sh)"
    log "agent: building the Debian $suite base ($packages) into $base"
    start=$SECONDS
    rm -rf "$base.tmp" && mkdir -p "$base.tmp"
    # The installed packages and versions, kept beside the layer for reference.
    list_hook="--customize-hook=dpkg-query --admindir=\"\$1/var/lib/dpkg\" -W > \"$base.tmp/packages.txt\""
    SOURCE_DATE_EPOCH=$base_epoch TMPDIR=$base.tmp mmdebstrap "${mm_args[@]}" "$list_hook" \
      "$suite" "$base.tmp/mmdebstrap.tar" "${sources[@]}" > "$base.tmp/mmdebstrap.log" 2>&1 ||
      { tail -n 40 "$base.tmp/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $base.tmp/mmdebstrap.log)"; }
    # apt's download directories, which mmdebstrap leaves owned by _apt or root depending on the
    # run (that alone made two builds differ), go with what they hold.
    mmtarfilter --path-exclude='/var/lib/apt/lists/*' --path-exclude='/var/cache/apt/*' \
      < "$base.tmp/mmdebstrap.tar" > "$base.tmp/base.tar"
    rm -f "$base.tmp/mmdebstrap.tar"
    log "agent: mmdebstrap $((SECONDS - start)) s, $(stat -c %s "$base.tmp/base.tar") bytes"
    "$oci_image" layer --layer "tar:$base.tmp/base.tar" --epoch "$base_epoch" --out-dir "$base.tmp" \
      --created-by "mmdebstrap --variant=essential $suite ($packages)" > "$base.tmp/layer.json.tmp"
    rm -f "$base.tmp/base.tar"
    rm -rf "$base"
    mv "$base.tmp" "$base"
    # The blob path recorded in layer.json is the final one.
    sed "s|$base.tmp|$base|" "$base/layer.json.tmp" > "$base/layer.json" && rm "$base/layer.json.tmp"
    log "agent: base layer ready in $((SECONDS - start)) s: $(cat "$base/layer.json")"
  fi
}

# The Debian layer first: it needs no compiler, and a missing tool shows before a long build.
if want agent; then agent_base; fi

if want operator || want agent; then
  # Both together, always: one feature resolution, so neither build invalidates the other.
  static_build -p sendense-operator -p sendense-agent --bin sendense-operator --bin sendense-agent
fi

if want operator; then
  bin=$(static_bin sendense-operator)
  rm -rf "$stage/operator" && mkdir -p "$stage/operator/usr/local/bin"
  install -m 0755 "$bin" "$stage/operator/usr/local/bin/sendense-operator"
  etc_files "$stage/operator"
  write_image operator "$operator_ref" "$(stage_hash "$stage/operator")" \
    --layer "dir:$stage/operator" --created-by "sendense-operator, /etc/passwd, /etc/group, /etc/nsswitch.conf" \
    --user 65532:65532 --entrypoint '["/usr/local/bin/sendense-operator"]' \
    --env PATH=/usr/local/bin:/usr/bin:/bin "${labels[@]}" \
    --label "org.opencontainers.image.title=sendense-operator"
fi

if want agent; then
  bin=$(static_bin sendense-agent)
  rm -rf "$stage/agent" && mkdir -p "$stage/agent/usr/local/bin"
  install -m 0755 "$bin" "$stage/agent/usr/local/bin/sendense-agent"
  write_image agent "$agent_ref" "$(stage_hash "$stage/agent") $(cat "$base/layer.json")" \
    --layer "built:$base/layer.json" \
    --layer "dir:$stage/agent" --created-by "sendense-agent" \
    --user 65532:65532 --cmd '["sendense-agent","--help"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${labels[@]}" \
    --label "org.opencontainers.image.title=sendense-agent"
fi
rm -rf "$stage"
