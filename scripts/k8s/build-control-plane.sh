#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler (and kubectl)
# from Debian bookworm's `kubernetes` source package (Kubernetes 1.20.2), without
# Docker and without downloads other than Debian packages. Idempotent: binaries
# are cached under ~/.cache/pensieve/k8s-<version>/bin and a rerun returns at once.
#
#   bash scripts/k8s/build-control-plane.sh        # prints the bin directory last
#
# Env: PENSIEVE_K8S_CACHE (default ~/.cache/pensieve/k8s-1.20.2),
#      PENSIEVE_K8S_WHAT (extra make targets, default "cmd/kubectl").
set -euo pipefail
version=1.20.2
cache="${PENSIEVE_K8S_CACHE:-$HOME/.cache/pensieve/k8s-$version}"
bin="$cache/bin"
targets=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
log() { echo "[k8s-build $(date +%H:%M:%S)] $*" >&2; }

# Bump when the source patches change: binaries built without them are rebuilt.
build_id="reflect2-go118-2"
have_all() {
    for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
    [ "$(cat "$bin/.build-id" 2>/dev/null)" = "$build_id" ] && command -v etcd >/dev/null
}
if have_all; then log "cached: $bin"; echo "$bin"; exit 0; fi

mkdir -p "$cache"
# One build at a time on this machine (the cores are shared).
exec 9>"$cache/.lock"
log "waiting for the build lock $cache/.lock"
flock 9
if have_all; then log "cached (built by another process): $bin"; echo "$bin"; exit 0; fi

apt_opts=(-o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"

need_pkgs=()
for p in golang-go rsync jq etcd-server iproute2; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "apt-get install ${need_pkgs[*]}"
    $sudo_ apt-get "${apt_opts[@]}" update -qq || true
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
if have_all; then log "cached: $bin"; echo "$bin"; exit 0; fi

src="$cache/src"
if [ ! -f "$src/.unpacked" ]; then
    # A deb-src entry derived from the configured Debian entry, with its own
    # source-parts directory and lists directory so the normal lists stay intact.
    aptdir="$cache/apt"
    mkdir -p "$aptdir/sources.list.d" "$aptdir/lists/partial"
    sources=/etc/apt/sources.list.d/debian.sources
    if [ -f "$sources" ]; then
        sed 's/^Types: deb$/Types: deb-src/' "$sources" > "$aptdir/sources.list.d/debian-src.sources"
    else
        grep -h '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$aptdir/sources.list.d/debian-src.list"
    fi
    src_opts=(-o "Dir::Etc::SourceParts=$aptdir/sources.list.d" -o "Dir::Etc::SourceList=/dev/null"
              -o "Dir::State::Lists=$aptdir/lists" "${apt_opts[@]}")
    log "apt-get update (deb-src lists in $aptdir/lists)"
    apt-get "${src_opts[@]}" update -qq >&2
    dl="$cache/dl"; mkdir -p "$dl"
    log "apt-get source --download-only kubernetes"
    (cd "$dl" && apt-get "${src_opts[@]}" source --download-only "kubernetes=$version*" >&2 \
        || apt-get "${src_opts[@]}" source --download-only kubernetes >&2)
    orig="$(ls "$dl"/kubernetes_*.orig.tar.* | head -1)"
    log "unpacking $(basename "$orig")"
    rm -rf "$src" "$src.tmp"; mkdir -p "$src.tmp"
    tar -xf "$orig" -C "$src.tmp"
    inner="$(find "$src.tmp" -mindepth 1 -maxdepth 1 -type d | head -1)"
    mv "$inner" "$src"; rm -rf "$src.tmp"
    touch "$src/.unpacked"
fi

# Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, whose map iteration
# links to reflect.mapiterinit with its pre-Go-1.18 signature; built with Debian's Go 1.19
# the API server crashes encoding maps (json-iterator, e.g. every custom resource).
# Replace that iteration with one through the reflect package's public MapRange.
r2="$src/vendor/github.com/modern-go/reflect2"
if ! grep -q "pensieve: reflect-based map iteration" "$r2/unsafe_map.go"; then
    log "patching vendored reflect2 map iteration for Go >= 1.18"
    python3 - "$r2/unsafe_map.go" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
start = s.index("func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {")
end = s.index("\n}\n", start) + 3
s = s[:start] + """// pensieve: reflect-based map iteration (reflect.mapiterinit changed its signature in Go 1.18).
func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {
	m := reflect.NewAt(type2.safeType.Type, obj).Elem()
	it := &reflectMapIterator{iter: m.MapRange()}
	it.has = it.iter.Next()
	return it
}

type reflectMapIterator struct {
	iter *reflect.MapIter
	has  bool
}

func (it *reflectMapIterator) HasNext() bool {
	return it.has
}

func (it *reflectMapIterator) Next() (interface{}, interface{}) {
	k, v := it.iter.Key().Interface(), it.iter.Value().Interface()
	it.has = it.iter.Next()
	return k, v
}

func (it *reflectMapIterator) UnsafeNext() (unsafe.Pointer, unsafe.Pointer) {
	k := reflect.New(it.iter.Key().Type())
	k.Elem().Set(it.iter.Key())
	v := reflect.New(it.iter.Value().Type())
	v.Elem().Set(it.iter.Value())
	it.has = it.iter.Next()
	return unsafe.Pointer(k.Pointer()), unsafe.Pointer(v.Pointer())
}
""" + s[end:]
open(p, "w").write(s)
PY
fi

gopath="$cache/gopath"
mkdir -p "$gopath/src/k8s.io" "$cache/home"
ln -sfn "$src" "$gopath/src/k8s.io/kubernetes"
what="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler ${PENSIEVE_K8S_WHAT-cmd/kubectl}"
log "make WHAT=\"$what\" (about 6 minutes on 2 cores)"
start=$(date +%s)
(
    cd "$gopath/src/k8s.io/kubernetes"
    export GOPATH="$gopath" CGO_ENABLED=0 HOME="$cache/home" GO111MODULE="${GO111MODULE:-off}"
    export GOFLAGS="${GOFLAGS:-}" GOCACHE="$cache/gocache" KUBE_VERBOSE=1
    # Debian's source has no .git; the version comes from these variables.
    export KUBE_GIT_VERSION="v$version" KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    make WHAT="$what" >&2
)
log "build took $(( $(date +%s) - start )) s"
mkdir -p "$bin"
out="$src/_output/local/bin/$(go env GOOS)/$(go env GOARCH)"
[ -d "$out" ] || out="$src/_output/bin"
for t in "${targets[@]}"; do
    if [ -x "$out/$t" ]; then install -m 0755 "$out/$t" "$bin/$t"; fi
done
for t in kube-apiserver kube-controller-manager kube-scheduler; do
    [ -x "$bin/$t" ] || { log "missing $t after build"; exit 1; }
done
echo "$build_id" > "$bin/.build-id"
# Free the space the build used, keep the binaries.
# Keep the patched source (309 MB) for a rebuild; the build outputs (several GB) go.
rm -rf "$src/_output"
log "done: $bin"
echo "$bin"
