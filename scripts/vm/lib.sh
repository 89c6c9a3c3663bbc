# shellcheck shell=bash
# Shared helpers for scripts/vm/{run,fetch-kernels,selftest}. Sourced, not executed.
#
# Everything downloaded or built lives outside the checkout, in
#   ${COREBLK_CACHE:-$HOME/.cache/coreblk}/vm/
# and is reused by later runs. The machine's own apt state is never touched:
# kernels are fetched with a private apt configuration whose mirror URI and
# keyring are derived at run time from the machine's Debian sources.

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_CACHE=${COREBLK_CACHE:-${HOME:-/root}/.cache/coreblk}/vm

# Modules the initramfs loads at boot (plus everything modules.dep says they
# need). Names that do not exist in a given kernel (e.g. crc32c-intel on 7.x)
# or that are built in are skipped. COREBLK_VM_MODULES adds more.
# The early ones are loaded before anything else (needed for the 9p mounts);
# the rest load in the background while init mounts the shares.
VM_EARLY_MODULES=(virtio_pci virtio_console 9p 9pnet_virtio nvme)
VM_BOOT_MODULES=(
  ublk_drv loop null_blk brd
  dm-mod dm-thin-pool dm-log-writes dm-flakey dm-delay dm-snapshot
  crc32c_generic crc32c-intel ext4 xfs
)

vm_log() { printf 'vm: %s\n' "$*" >&2; }
vm_die() { printf 'vm: error: %s\n' "$*" >&2; exit 125; }

# kernel flavour -> Debian suite
vm_suite_for() {
  case "$1" in
    lts) echo bookworm-backports ;;
    latest) echo trixie-backports ;;
    *) vm_die "unknown kernel '$1' (expected lts or latest)" ;;
  esac
}

# ---------------------------------------------------------------- host tools

# command -> Debian package providing it
declare -A VM_TOOL_PKG=(
  [qemu-system-x86_64]=qemu-system-x86
  [cpio]=cpio
  [depmod]=kmod
  [modprobe]=kmod
  [zstd]=zstd
  [xz]=xz-utils
  [dpkg-deb]=dpkg
  [apt-get]=apt
  [timeout]=coreutils
)

vm_have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# Path of a statically linked busybox (Debian busybox-static), or empty.
vm_static_busybox() {
  local b
  for b in /bin/busybox /usr/bin/busybox "$(command -v busybox 2>/dev/null || true)"; do
    [ -n "$b" ] && [ -x "$b" ] || continue
    case "$(LC_ALL=C ldd "$b" 2>&1 || true)" in
      *"not a dynamic executable"*) echo "$b"; return 0 ;;
    esac
  done
  return 1
}

# vm_ensure_tools [--install] CMD...  (CMD may be "busybox-static")
vm_ensure_tools() {
  local install=0
  if [ "${1:-}" = --install ]; then install=1; shift; fi
  local missing=() pkgs=() t
  for t in "$@"; do
    if [ "$t" = busybox-static ]; then
      vm_static_busybox >/dev/null || { missing+=("static busybox"); pkgs+=(busybox-static); }
    elif ! vm_have "$t"; then
      missing+=("$t"); pkgs+=("${VM_TOOL_PKG[$t]:-$t}")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  # de-duplicate package names
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  if [ $install -eq 0 ]; then
    vm_die "${missing[*]} not found: run scripts/vm/fetch-kernels or apt-get install ${pkgs[*]}"
  fi
  if [ "$(id -u)" -ne 0 ]; then
    vm_die "${missing[*]} not found and not root: apt-get install ${pkgs[*]}"
  fi
  vm_log "installing ${pkgs[*]} (waiting for the dpkg lock if another apt is running)"
  # DPkg::Lock::Timeout makes apt wait for a concurrent apt/dpkg instead of failing.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1800 install -y \
    --no-install-recommends "${pkgs[@]}" >&2 ||
    vm_die "apt-get install ${pkgs[*]} failed"
  for t in "$@"; do
    if [ "$t" = busybox-static ]; then vm_static_busybox >/dev/null || vm_die "no static busybox after install"
    else vm_have "$t" || vm_die "$t still missing after installing ${pkgs[*]}"; fi
  done
}

# ---------------------------------------------------------------- apt (private)

# Print "URI<TAB>SIGNED_BY" of the main Debian archive, from the machine's own
# apt configuration (deb822 debian.sources, else one-line sources.list).
vm_debian_mirror() {
  local f=/etc/apt/sources.list.d/debian.sources codename=""
  # shellcheck disable=SC1091
  codename=$( (. /etc/os-release && echo "${VERSION_CODENAME:-}") 2>/dev/null || true)
  if [ -r "$f" ]; then
    awk -v want="$codename" '
      function flush() {
        if (uris != "" && types ~ /(^| )deb( |$)/ && uris !~ /security/) {
          n = split(suites, s, " "); hit = 0
          for (i = 1; i <= n; i++) if (s[i] == want) hit = 1
          if (hit && best == "") best = uris "\t" sb
          if (first == "") first = uris "\t" sb
        }
        uris = ""; suites = ""; sb = ""; types = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]*#/ { next }
      tolower($1) == "uris:"      { uris = $2 }
      tolower($1) == "suites:"    { $1 = ""; suites = $0 }
      tolower($1) == "types:"     { $1 = ""; types = $0 " " }
      tolower($1) == "signed-by:" { sb = $2 }
      END { flush(); if (best != "") print best; else if (first != "") print first }
    ' "$f"
    return 0
  fi
  if [ -r /etc/apt/sources.list ]; then
    awk '$1 == "deb" && $0 !~ /security/ {
           uri = ""; sb = ""
           for (i = 2; i <= NF; i++) {
             if ($i ~ /^\[/ || opt) { opt = ($i !~ /\]$/); if ($i ~ /signed-by=/) { sb = $i; sub(/.*signed-by=/, "", sb); sub(/\]$/, "", sb) } continue }
             uri = $i; break
           }
           if (uri != "") { print uri "\t" sb; exit }
         }' /etc/apt/sources.list
  fi
}

# Run apt-get/apt-cache against the private state of one flavour.
vm_apt() {
  local flavour=$1 tool=$2; shift 2
  local d="$VM_CACHE/apt/$flavour"
  "$tool" \
    -o Dir::State::Lists="$d/lists" \
    -o Dir::State::status=/dev/null \
    -o Dir::Etc::SourceList="$d/sources.list" \
    -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::Cache="$d/cache" \
    -o Dir::Cache::archives="$d/archives" \
    -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache="" \
    -o APT::Sandbox::User=root \
    -o Acquire::Languages=none \
    "$@"
}

vm_apt_setup() {
  local flavour=$1 suite line uri sb d
  suite=$(vm_suite_for "$flavour")
  d="$VM_CACHE/apt/$flavour"
  mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/cache"
  line=$(vm_debian_mirror || true)
  [ -n "$line" ] || vm_die "cannot find a Debian archive URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
  uri=${line%%$'\t'*}
  sb=${line#*$'\t'}
  if [ -n "$sb" ]; then
    printf 'deb [signed-by=%s] %s %s main\n' "$sb" "$uri" "$suite" >"$d/sources.list.new"
  else
    printf 'deb %s %s main\n' "$uri" "$suite" >"$d/sources.list.new"
  fi
  mv "$d/sources.list.new" "$d/sources.list"
  vm_log "$flavour: apt-get update ($suite)"
  vm_apt "$flavour" apt-get -q update >&2 || vm_die "apt-get update for $suite failed"
}

# All packages needed for the kernel of a flavour: follow the exact-version
# (= VERSION) dependencies of linux-image-amd64 recursively. That is the set
# built from the kernel sources (image, binary, modules, base); generic deps
# like kmod or initramfs-tools are not version-pinned and are skipped.
vm_kernel_pkgs() {
  local flavour=$1
  local -a queue=(linux-image-amd64) seen=()
  local p dep
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}; queue=("${queue[@]:1}")
    case " ${seen[*]} " in *" $p "*) continue ;; esac
    seen+=("$p")
    while IFS= read -r dep; do
      [ -n "$dep" ] && queue+=("$dep")
    done < <(vm_apt "$flavour" apt-cache show --no-all-versions "$p" 2>/dev/null |
      awk '/^(Pre-)?Depends:/ { sub(/^[^:]*:/, ""); n = split($0, d, ","); for (i = 1; i <= n; i++) {
             if (d[i] ~ /\|/) continue
             if (d[i] ~ /\(= /) { x = d[i]; sub(/^[ \t]+/, "", x); sub(/[ \t(].*$/, "", x); print x } } }
           /^$/ { exit }')
  done
  printf '%s\n' "${seen[@]}"
}

# ---------------------------------------------------------------- kernels

# Directory of the prepared kernel of a flavour (symlink "current").
vm_kernel_dir() { echo "$VM_CACHE/kernels/$1"; }

# vm_fetch_kernel FLAVOUR [update]: download + extract + depmod (cached).
# Serialised per flavour with flock, so concurrent callers do not race apt.
vm_fetch_kernel() {
  local flavour=$1 update=${2:-0} lockfd rc=0
  if [ "$update" = 0 ] && [ -f "$(vm_kernel_dir "$flavour")/current/ready" ]; then
    return 0
  fi
  mkdir -p "$VM_CACHE"
  exec {lockfd}>"$VM_CACHE/.lock-$flavour"
  flock "$lockfd"
  vm_fetch_kernel_locked "$flavour" "$update" || rc=$?
  exec {lockfd}>&-
  return $rc
}

vm_fetch_kernel_locked() {
  local flavour=$1 update=$2
  local kdir ver pkgs root kv vmlinuz d
  kdir=$(vm_kernel_dir "$flavour")
  if [ "$update" = 0 ] && [ -f "$kdir/current/ready" ]; then
    return 0
  fi
  vm_ensure_tools --install apt-get dpkg-deb depmod modprobe xz zstd
  vm_apt_setup "$flavour"
  ver=$(vm_apt "$flavour" apt-cache show --no-all-versions linux-image-amd64 2>/dev/null | awk '/^Version:/ { print $2; exit }')
  [ -n "$ver" ] || vm_die "linux-image-amd64 not found in $(vm_suite_for "$flavour")"
  d="$kdir/$ver"
  if [ -f "$d/ready" ]; then
    ln -sfn "$ver" "$kdir/current"
    vm_log "$flavour: linux-image-amd64 $ver already prepared"
    return 0
  fi
  mapfile -t pkgs < <(vm_kernel_pkgs "$flavour")
  vm_log "$flavour: downloading ${pkgs[*]} ($ver)"
  local ad="$VM_CACHE/apt/$flavour/archives"
  (cd "$ad" && vm_apt "$flavour" apt-get -q download "${pkgs[@]}" >&2) ||
    vm_die "apt-get download ${pkgs[*]} failed"
  rm -rf "$d"
  root="$d/root"
  mkdir -p "$root"
  local p deb pv f
  for p in "${pkgs[@]}"; do
    pv=$(vm_apt "$flavour" apt-cache show --no-all-versions "$p" | awk '/^Version:/ { print $2; exit }')
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' escaped as %3a
    deb=""
    for f in "$ad/${p}_${pv//:/%3a}_"*.deb; do [ -f "$f" ] && deb=$f; done
    [ -n "$deb" ] || vm_die "downloaded .deb for $p $pv not found in $ad"
    vm_log "$flavour: extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$root"
  done
  # kmod 30 only knows /lib/modules; merged-/usr packages ship /usr/lib/modules.
  if [ ! -e "$root/lib" ] && [ -d "$root/usr/lib/modules" ]; then ln -s usr/lib "$root/lib"; fi
  kv=$(ls "$root/lib/modules" | head -n 1)
  [ -n "$kv" ] || vm_die "no /lib/modules/<version> in the extracted $flavour kernel"
  vmlinuz=""
  for p in "$root/boot/vmlinuz-$kv" "$root/lib/modules/$kv/vmlinuz" "$root/usr/lib/modules/$kv/vmlinuz"; do
    if [ -f "$p" ]; then vmlinuz=$p; break; fi
  done
  [ -n "$vmlinuz" ] || vmlinuz=$(find "$root" -name 'vmlinuz*' -type f | head -n 1)
  [ -n "$vmlinuz" ] || vm_die "no vmlinuz found in the $flavour kernel packages (${pkgs[*]})"
  vm_log "$flavour: depmod $kv"
  depmod -b "$root" "$kv" || vm_die "depmod -b $root $kv failed"
  ln -sfn "${vmlinuz#"$d/"}" "$d/vmlinuz"
  printf '%s\n' "$kv" >"$d/kernel-release"
  printf '%s\n' "$ver" >"$d/package-version"
  printf '%s\n' "${pkgs[@]}" >"$d/packages"
  touch "$d/ready"
  ln -sfn "$ver" "$kdir/current"
  vm_log "$flavour: ready: $kv (package $ver)"
}

# ---------------------------------------------------------------- initramfs

# Drop the appended module signature (the guest kernel does not enforce
# signatures; verifying them costs noticeable time under TCG).
# Layout: ... | signature | struct module_signature (12 bytes, sig_len is a
# big-endian u32 at offset 8) | "~Module signature appended~\n" (28 bytes).
vm_strip_modsig() {
  local f=$1 size magic siglen
  size=$(stat -c %s "$f")
  [ "$size" -gt 40 ] || return 0
  magic=$(tail -c 28 "$f" | tr -d '\n')
  [ "$magic" = "~Module signature appended~" ] || return 0
  siglen=$(tail -c 32 "$f" | head -c 4 | od -An -tu1 | awk '{ print (($1 * 256 + $2) * 256 + $3) * 256 + $4 }')
  truncate -s $((size - 40 - siglen)) "$f"
}

# vm_build_initramfs FLAVOUR -> prints path of the cpio (cached by content key)
vm_build_initramfs() {
  local flavour=$1
  local kd root kv bb key out tmp mods m line f rel
  kd="$(vm_kernel_dir "$flavour")/current"
  [ -f "$kd/ready" ] || vm_die "kernel '$flavour' is not prepared: run scripts/vm/fetch-kernels $flavour"
  root="$kd/root"
  kv=$(cat "$kd/kernel-release")
  bb=$(vm_static_busybox) || vm_die "static busybox not found: run scripts/vm/fetch-kernels or apt-get install busybox-static"
  mods=("${VM_EARLY_MODULES[@]}" "${VM_BOOT_MODULES[@]}")
  # shellcheck disable=SC2206
  [ -n "${COREBLK_VM_MODULES:-}" ] && mods+=(${COREBLK_VM_MODULES//,/ })
  # COREBLK_VM_LAZY_MODULES: put these in the initramfs but do not load them at
  # boot; the kernel loads them on first use (e.g. "xfs" saves 1-3 s of boot).
  local lazy=${COREBLK_VM_LAZY_MODULES:-}
  lazy=" ${lazy//,/ } "
  key=$( { echo "v3 $kv ${COREBLK_VM_KEEP_MODSIG:-0} $lazy"; cat "$VM_DIR/guest-init" "$VM_DIR/guest-modprobe" "$VM_DIR/lib.sh"; echo "${mods[*]}"; sha256sum "$bb"; } |
    sha256sum | cut -c1-16)
  out="$VM_CACHE/initramfs/$kv-$key.cpio"
  if [ -f "$out" ]; then echo "$out"; return 0; fi
  vm_ensure_tools --install cpio depmod modprobe xz zstd
  mkdir -p "$VM_CACHE/initramfs"
  tmp=$(mktemp -d "$VM_CACHE/initramfs/build.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  local ir="$tmp/root" md
  mkdir -p "$ir"/{bin,sbin,etc,proc,sys,dev,host,ctl,tmp,run} "$ir/lib/modules/$kv"
  md="$ir/lib/modules/$kv"
  cp "$bb" "$ir/bin/busybox"
  ln -s busybox "$ir/bin/sh"
  cp "$VM_DIR/guest-init" "$ir/init"
  cp "$VM_DIR/guest-modprobe" "$ir/sbin/modprobe"
  chmod 755 "$ir/init" "$ir/sbin/modprobe"
  # Dependency order from the full kernel's modules.dep: modprobe --show-depends
  # prints one "insmod PATH" per module, dependencies first, softdeps included.
  closure() { # MODULE -> relative paths in load order (nothing if unavailable/built in)
    modprobe -d "$root" -S "$kv" --show-depends "$1" 2>/dev/null | while IFS= read -r line; do
      case "$line" in
        insmod\ *) f=${line#insmod }; f=${f%% *}; echo "${f#"$root/lib/modules/$kv/"}" ;;
      esac
    done
  }
  add_uniq() { # FILE < lines: append lines not yet in FILE
    local l
    while IFS= read -r l; do grep -qxF "$l" "$1" || echo "$l" >>"$1"; done
  }
  : >"$tmp/early"
  for m in "${VM_EARLY_MODULES[@]}"; do closure "$m" | add_uniq "$tmp/early"; done
  # The other modules load in two parallel lanes (the guest has 2+ vCPUs and
  # a big module such as xfs takes a second under TCG). A module shared by both
  # lanes is harmless: the kernel makes the second insmod wait for the first.
  : >"$tmp/lane0"; : >"$tmp/lane1"; : >"$tmp/lazy"
  local w0=0 w1=0 sz l lane j=0
  : >"$tmp/sizes"
  for m in "${mods[@]:${#VM_EARLY_MODULES[@]}}"; do
    j=$((j + 1))
    closure "$m" | grep -vxF -f "$tmp/early" >"$tmp/c.$j" || true
    [ -s "$tmp/c.$j" ] || continue
    case "$lazy" in *" $m "*) add_uniq "$tmp/lazy" <"$tmp/c.$j"; continue ;; esac
    sz=0
    while IFS= read -r l; do sz=$((sz + $(stat -c %s "$root/lib/modules/$kv/$l"))); done <"$tmp/c.$j"
    echo "$sz $j" >>"$tmp/sizes"
  done
  # biggest first, each to the currently lighter lane
  while read -r sz j; do
    if [ $w0 -le $w1 ]; then lane=0; w0=$((w0 + sz)); else lane=1; w1=$((w1 + sz)); fi
    add_uniq "$tmp/lane$lane" <"$tmp/c.$j"
  done < <(sort -rn "$tmp/sizes")
  # Decompress: busybox insmod cannot read .ko.zst and kmod 30 cannot pass
  # compressed modules to the kernel either.
  local rel src dst n=0
  for f in early lane0 lane1 lazy; do
    while IFS= read -r rel; do
      src="$root/lib/modules/$kv/$rel"
      dst=${rel%.xz}; dst=${dst%.zst}; dst=${dst%.gz}
      echo "$dst" >>"$ir/etc/modules.$f"
      [ -f "$md/$dst" ] && continue
      n=$((n + 1))
      mkdir -p "$(dirname "$md/$dst")"
      case "$rel" in
        *.ko.xz) xz -dc "$src" >"$md/$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$md/$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$md/$dst" ;;
        *) cp "$src" "$md/$dst" ;;
      esac
      [ "${COREBLK_VM_KEEP_MODSIG:-0}" = 1 ] || vm_strip_modsig "$md/$dst"
    done <"$tmp/$f"
  done
  for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -f "$root/lib/modules/$kv/$f" ] && cp "$root/lib/modules/$kv/$f" "$md/"
  done
  depmod -b "$ir" "$kv" || vm_die "depmod of the initramfs module tree failed"
  printf '%s\n' "$kv" >"$ir/etc/kernel-release"
  (cd "$ir" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$tmp/initramfs.cpio" ||
    vm_die "cpio failed"
  mv "$tmp/initramfs.cpio" "$out"
  # images of older harness versions (kept an hour for runs starting right now)
  find "$VM_CACHE/initramfs" -maxdepth 1 -name "$kv-*.cpio" ! -name "${out##*/}" -mmin +60 -delete 2>/dev/null || true
  vm_log "$flavour: built initramfs $(basename "$out") ($(du -h "$out" | cut -f1), $n modules)"
  echo "$out"
}
