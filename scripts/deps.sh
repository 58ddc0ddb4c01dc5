# Sourced by scripts/test and scripts/demo: installs the Debian packages braid's tests and demo
# run for real, only when missing, so a warm machine pays nothing:
#   iproute2     ip, tc, ss, nstat (the lab's namespaces, links and shaping; kernel counters)
#   nftables     nft (the lab's loss and blackholes; tests read braid's own tables)
#   iperf3       unmodified iperf3 through the gateway (tests, gateway benchmark)
#   nginx-light  an unmodified web server behind the converter (tests)
#   curl         an unmodified client through the gateway (tests, demo)
#   procps       sysctl (lab tests)
#   systemd      systemd-analyze verify of the units (package test)
#   binutils     strip, for the .deb (scripts/package)
braid_require_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "$0: needs root (it builds network namespaces); run: sudo $0" >&2
    exit 1
  fi
}

braid_install_deps() {
  local pkgs=(iproute2 nftables iperf3 nginx-light curl procps systemd binutils)
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null; then
    echo "$0: cargo (Rust toolchain) not found; install it with rustup first" >&2
    exit 1
  fi
}
