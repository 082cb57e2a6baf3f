# netns.sh: simulated hosts for multi-host tests, sourced by multihost.sh.
#
#   mh_setup N     makes namespaces <id>-h0 .. <id>-hN: h0 runs mpirun, h1..hN
#                  are the hosts (10.77.0.11, .12, ...), each with its own
#                  hostname (a UTS namespace per command). Writes
#                  $MH_DIR/hosts (the hostfile, slots=$MH_SLOTS) and
#                  $MH_DIR/nsrsh (the rsh agent Open MPI starts its daemons with).
#   mh_in0 CMD...  runs CMD in h0 (the launch host).
#   mh_kill_host I SIGKILLs every process of host I (as if it lost power).
#   mh_cut_host I  takes host I's link down (as if its cable were pulled).
#   mh_teardown    kills what runs in the namespaces and deletes them.
#
# The bridge and every veth live inside h0, so nothing is added to the
# machine's own network namespace and deleting the namespaces removes all of
# it. Namespace names carry this shell's pid, so runs in parallel (ctest -j)
# do not collide, teardown touches only what this run made, and a later run
# removes those of a run whose shell died before its trap could.
# Exit code 77 (ctest SKIP_RETURN_CODE) where namespaces cannot be made.

MH_ID="moemh$$"
MH_HOSTS=0
MH_SLOTS="${MH_SLOTS:-2}"
MH_MADE=()

mh_ns() { echo "$MH_ID-h$1"; }

mh_skip() {
  echo "SKIP: $* (multi-host tests need root and network namespaces: run ctest as root," \
       "outside a container that forbids 'ip netns add')"
  exit 77
}

# Namespaces of an earlier run of this harness whose shell is gone (killed
# before its trap ran, e.g. by a ctest timeout): their processes and them.
mh_reap_stale() {
  local ns pid p
  for ns in $(ip netns list 2>/dev/null | grep -oE '^moemh[0-9]+-h[0-9]+'); do
    pid="${ns#moemh}"; pid="${pid%%-*}"
    kill -0 "$pid" 2>/dev/null && continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns delete "$ns" 2>/dev/null
  done
}

mh_setup() {
  MH_HOSTS="$1"
  command -v ip >/dev/null || mh_skip "the 'ip' command (iproute2) is missing"
  command -v unshare >/dev/null || mh_skip "the 'unshare' command (util-linux) is missing"
  [ "$(id -u)" -eq 0 ] || mh_skip "not root"
  mh_reap_stale
  ip netns add "$(mh_ns 0)" 2>"$MH_DIR/netns.err" || mh_skip "ip netns add failed: $(cat "$MH_DIR/netns.err")"
  MH_MADE+=("$(mh_ns 0)")
  local h0
  h0="$(mh_ns 0)"
  # In h0 the bridge is named eth0, so every host, launch host included, talks over "eth0".
  ip -n "$h0" link set lo up
  ip -n "$h0" link add eth0 type bridge
  ip -n "$h0" addr add 10.77.0.10/24 dev eth0
  ip -n "$h0" link set eth0 up
  : >"$MH_DIR/hosts"
  local i
  for i in $(seq 1 "$MH_HOSTS"); do
    local ns
    ns="$(mh_ns "$i")"
    ip netns add "$ns" || { echo "netns.sh: ip netns add $ns failed"; return 1; }
    MH_MADE+=("$ns")
    ip -n "$ns" link set lo up
    ip -n "$h0" link add "vh$i" type veth peer name eth0 netns "$ns"
    ip -n "$h0" link set "vh$i" master eth0
    ip -n "$h0" link set "vh$i" up
    ip -n "$ns" addr add "10.77.0.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    echo "10.77.0.$((10 + i)) slots=$MH_SLOTS" >>"$MH_DIR/hosts"
  done
  # Open MPI runs "nsrsh HOST COMMAND..." to start its daemon on HOST.
  cat >"$MH_DIR/nsrsh" <<EOF
#!/bin/sh
host="\$1"; shift
i="\${host##*.}"; i=\$((i - 10))
exec ip netns exec "$MH_ID-h\$i" unshare --uts sh -c "hostname host\$i; \$*"
EOF
  chmod +x "$MH_DIR/nsrsh"
  # Wait until every link reports UP (veths take a moment); bounded.
  for i in $(seq 1 "$MH_HOSTS"); do
    local ok=0 _
    for _ in $(seq 50); do
      if ip -n "$h0" link show "vh$i" | grep -q "state UP" &&
         ip -n "$(mh_ns "$i")" link show eth0 | grep -q "state UP"; then ok=1; break; fi
      sleep 0.1
    done
    [ "$ok" -eq 1 ] || { echo "netns.sh: the link of host $i did not come up"; return 1; }
  done
}

mh_in0() { ip netns exec "$(mh_ns 0)" unshare --uts sh -c 'hostname host0; exec "$@"' sh "$@"; }

mh_kill_host() { local p; for p in $(ip netns pids "$(mh_ns "$1")"); do kill -KILL "$p" 2>/dev/null; done; }

mh_cut_host() { ip -n "$(mh_ns 0)" link set "vh$1" down; }

mh_teardown() {
  local ns p
  for ns in "${MH_MADE[@]+"${MH_MADE[@]}"}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  done
  for ns in "${MH_MADE[@]+"${MH_MADE[@]}"}"; do ip netns delete "$ns" 2>/dev/null; done
  MH_MADE=()
}
