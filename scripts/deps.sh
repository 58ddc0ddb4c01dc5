# Sourced by scripts/test and scripts/demo: installs the Debian packages braid's tests and demo
# run for real (iproute2 for namespaces, nftables, curl, iperf3, nginx, mptcpize, tcpdump),
# only when missing, so a warm machine pays nothing.
braid_require_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "$0: needs root (it builds network namespaces); run: sudo $0" >&2
    exit 1
  fi
}

braid_install_deps() {
  local pkgs=(iproute2 nftables iperf3 nginx-light curl mptcpd tcpdump socat procps ethtool)
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
