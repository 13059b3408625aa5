#!/bin/sh
# Installs the Debian package in a Debian 12 (bookworm) system booted with a real systemd
# as PID 1 in a container, and checks what an operator does with it:
#
#   install → configure (a WhatsApp connector, secrets as credentials) →
#   systemctl enable --now → READY (is-active) → a signed webhook (HMAC by openssl) →
#   the send gate blocks the number → optout-sync status / lookup → stop →
#   offline commands: refused as root, working as the service's own user →
#   reinstall (an upgrade) keeps the configuration and the store → purge removes both.
#
# Usage (as root; not part of CI):
#   scripts/build-deb.sh
#   scripts/systemd-container-test.sh [path/to/optout-sync_….deb]
#
# Needs debootstrap and systemd-nspawn (apt-get install debootstrap systemd-container) and
# network access to a Debian mirror for the first run. Environment:
#   OPTOUT_CT_DIR  where the base tree is cached and each run's tree is made
#                  (default /var/tmp/optout-sync-container)
#   OPTOUT_CT_MIRROR  a Debian mirror URL for debootstrap (default: debootstrap's own)
#
# The container's console goes to $OPTOUT_CT_DIR/console.log; the check's own output is
# printed at the end, and the exit code is the check's (0 when everything passed).
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "systemd-container-test: run as root (debootstrap and systemd-nspawn need it)" >&2
    exit 1
fi
for tool in debootstrap systemd-nspawn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "systemd-container-test: $tool is missing (apt-get install debootstrap systemd-container)" >&2
        exit 1
    fi
done

repo=$(cd "$(dirname "$0")/.." && pwd)
deb=${1:-$(ls -t "${CARGO_TARGET_DIR:-$repo/target}"/debian/optout-sync_*.deb 2>/dev/null | head -n 1)}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    echo "systemd-container-test: no package; build one with scripts/build-deb.sh" >&2
    exit 1
fi
work=${OPTOUT_CT_DIR:-/var/tmp/optout-sync-container}
base=$work/base
tree=$work/run
mkdir -p "$work"

# The base system, made once and reused: systemd as init, and what the check uses.
if [ ! -f "$base/.complete" ]; then
    rm -rf "$base"
    # shellcheck disable=SC2086 # the mirror is optional
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,curl,openssl,ca-certificates \
        bookworm "$base" ${OPTOUT_CT_MIRROR:-}
    touch "$base/.complete"
fi

# Each run starts from a fresh copy of the base.
rm -rf "$tree"
cp -a "$base" "$tree"
rm -f "$tree/.complete"
cp "$deb" "$tree/root/optout-sync.deb"
echo "optout-sync-ct" > "$tree/etc/hostname"

# The check runs inside, once the system is up, then powers the container off.
cat > "$tree/root/check.sh" <<'CHECK'
#!/bin/sh
set -eu
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*"; exit 1; }
show() { echo "\$ $*"; "$@"; }
number=+14155552671

step "install the package"
show dpkg -i /root/optout-sync.deb
show dpkg-query -W optout-sync
show systemctl is-enabled optout-sync
state=$(systemctl is-active optout-sync || true)
echo "is-active: $state (not started before it is configured)"
show ls -l /usr/bin/optout-sync /etc/optout-sync/optout-sync.toml /lib/systemd/system/optout-sync.service
show ls /usr/share/man/man1/optout-sync.1.gz /usr/share/man/man1/optout-sync-lookup.1.gz \
    /usr/share/bash-completion/completions/optout-sync

step "configure: one WhatsApp connector, its secrets as systemd credentials"
app_secret=$(openssl rand -hex 32)
gate_token=$(openssl rand -hex 16)
(
    umask 077
    mkdir -p /etc/optout-sync/credentials
    printf %s "$app_secret" > /etc/optout-sync/credentials/whatsapp-app-secret
    openssl rand -hex 16 | tr -d '\n' > /etc/optout-sync/credentials/whatsapp-verify-token
    printf %s "$gate_token" > /etc/optout-sync/credentials/gate-token
)
cat > /etc/optout-sync/optout-sync.toml <<'EOF'
# Written by the container check: no vendor is reached.
[daemon]
state_dir = "/var/lib/optout-sync"
listen = "127.0.0.1:8088"
control_socket = "/run/optout-sync/control.sock"
gate_token = { credential = "gate-token" }

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{ credential = "whatsapp-app-secret" }]
verify_token = { credential = "whatsapp-verify-token" }
EOF
mkdir -p /etc/systemd/system/optout-sync.service.d
cat > /etc/systemd/system/optout-sync.service.d/credentials.conf <<'EOF'
[Service]
LoadCredential=whatsapp-app-secret:/etc/optout-sync/credentials/whatsapp-app-secret
LoadCredential=whatsapp-verify-token:/etc/optout-sync/credentials/whatsapp-verify-token
LoadCredential=gate-token:/etc/optout-sync/credentials/gate-token
EOF
systemctl daemon-reload

step "systemctl enable --now optout-sync"
show systemctl enable --now optout-sync
# Type=notify: `start` returned once the daemon sent READY=1.
show systemctl is-active optout-sync
show systemctl show -p Type,Result,NRestarts,StatusText optout-sync

step "a signed webhook: STOP from $number"
now=$(date +%s)
body='{"object":"whatsapp_business_account","entry":[{"id":"419561257915477","changes":[{"field":"messages","value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"wa_id":"14155552671","profile":{"name":"Container Check"}}],"messages":[{"from":"14155552671","id":"wamid.container-check-1","timestamp":"'$now'","type":"text","text":{"body":"STOP"}}]}}]}]}'
signature=$(printf %s "$body" | openssl dgst -sha256 -hmac "$app_secret" -r | cut -d' ' -f1)
post() {
    curl -sS -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
        -H "X-Hub-Signature-256: sha256=$1" --data-binary "$body" \
        http://127.0.0.1:8088/webhooks/whatsapp
}
code=$(post "$signature")
echo "signed: HTTP $code"
[ "$code" = 200 ] || fail "a signed webhook was not accepted"
code=$(post 0000000000000000000000000000000000000000000000000000000000000000)
echo "wrongly signed: HTTP $code"
[ "$code" = 403 ] || fail "a wrongly signed webhook was not refused"

step "the send gate blocks $number"
i=0
until gate=$(curl -sS -H "Authorization: Bearer $gate_token" "http://127.0.0.1:8088/v1/consent/$number") &&
    echo "$gate" | grep -q '"allowed":false'; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || fail "the gate still allows $number: $gate"
    sleep 0.1
done
echo "$gate" | cut -c1-160

step "optout-sync status, lookup (through the running daemon)"
show optout-sync status
show optout-sync lookup "$number"

step "the store: private to the service's dynamic user"
show ls -ld /var/lib/optout-sync /var/lib/private/optout-sync
loose=$(find /var/lib/private/optout-sync -perm /077 | head -n 5)
[ -z "$loose" ] || fail "readable by others: $loose"
echo "no file in the store is readable by group or others"

step "stop"
show systemctl stop optout-sync
show systemctl show -p Result,ExecMainStatus optout-sync
[ "$(systemctl show -p ExecMainStatus --value optout-sync)" = 0 ] || fail "no clean exit"

step "offline commands: as root, refused (the store belongs to the dynamic user)"
set +e
optout-sync lookup "$number" 2>&1
code=$?
set -e
echo "exit code $code"
[ "$code" = 1 ] || fail "root was not refused"
owner=$(stat -c %u /var/lib/private/optout-sync)
foreign=$(find /var/lib/private/optout-sync ! -uid "$owner" | head -n 5)
[ -z "$foreign" ] || fail "files not owned by the service's user: $foreign"
echo "nothing created: every file still belongs to uid $owner"

step "offline commands: as the service's user, through systemd-run"
run_as_service() {
    systemd-run --pipe --wait --quiet --collect -p DynamicUser=yes -p User=optout-sync \
        -p StateDirectory=optout-sync -p StateDirectoryMode=0700 "$@"
}
echo "\$ systemd-run … optout-sync lookup $number"
run_as_service optout-sync lookup "$number" | tee /tmp/lookup.txt
grep -q 'opted_out' /tmp/lookup.txt || fail "lookup as the service's user"
echo "\$ systemd-run … optout-sync audit export | head -n 2"
run_as_service optout-sync audit export | head -n 2 | cut -c1-160
[ "$(stat -c %u /var/lib/private/optout-sync)" = "$owner" ] || fail "the store changed hands"
foreign=$(find /var/lib/private/optout-sync ! -uid "$owner" | head -n 5)
[ -z "$foreign" ] || fail "files not owned by the service's user: $foreign"
echo "the store still belongs to uid $owner, every file in it too"

step "what does not work: runuser (no such user) and setpriv (/var/lib/private is 0700 root)"
set +e
show runuser -u optout-sync -- optout-sync lookup "$number" 2>&1
show ls -ld /var/lib/private
show setpriv --reuid="$owner" --regid="$owner" --clear-groups optout-sync lookup "$number" 2>&1 | head -n 2
set -e

step "reinstall while running (the upgrade path): restarted, configuration and store kept"
show systemctl start optout-sync
before=$(systemctl show -p MainPID --value optout-sync)
show dpkg -i /root/optout-sync.deb
after=$(systemctl show -p MainPID --value optout-sync)
[ "$(systemctl is-active optout-sync)" = active ] && [ "$after" != "$before" ] ||
    fail "not restarted after the upgrade (MainPID $before → $after)"
echo "restarted after the upgrade: MainPID $before → $after"
grep -q 'credential = "whatsapp-app-secret"' /etc/optout-sync/optout-sync.toml ||
    fail "the edited configuration was replaced"
echo "the edited /etc/optout-sync/optout-sync.toml is kept"
optout-sync lookup "$number" | head -n 2
optout-sync lookup "$number" | grep -q opted_out || fail "the store was lost"

step "purge (the daemon still running)"
show dpkg --purge optout-sync
state=$(systemctl is-active optout-sync || true)
echo "is-active: $state"
[ "$state" != active ] || fail "still running after purge"
for gone in /usr/bin/optout-sync /etc/optout-sync/optout-sync.toml /lib/systemd/system/optout-sync.service \
    /var/lib/optout-sync /var/lib/private/optout-sync; do
    [ ! -e "$gone" ] || fail "$gone is left after purge"
done
echo "binary, unit, configuration and store are gone"
show ls -A /etc/optout-sync

echo
echo "PASSED on $(. /etc/os-release && echo "$PRETTY_NAME"), $(systemctl --version | head -n 1)"
CHECK
chmod 755 "$tree/root/check.sh"

cat > "$tree/etc/systemd/system/optout-sync-check.service" <<'UNIT'
[Unit]
Description=optout-sync package check
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c '/root/check.sh > /root/check.log 2>&1; echo $? > /root/check.rc'
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/optout-sync-check.service \
    "$tree/etc/systemd/system/multi-user.target.wants/optout-sync-check.service"

# Boot it. Where the host itself does not run systemd (a build container, say), nspawn
# lacks what systemd provides on /run/systemd; give it a private tmpfs there, in a mount
# namespace of its own, so nothing changes on the host.
boot="timeout 900 systemd-nspawn --quiet --register=no --directory=$tree --boot"
echo "booting Debian 12 in $tree (console: $work/console.log)"
if [ -d /run/systemd/system ]; then
    $boot > "$work/console.log" 2>&1 || true
else
    unshare --mount --propagation private sh -eu -c '
        mkdir -p /run/systemd
        mount -t tmpfs -o mode=0755 tmpfs /run/systemd
        mkdir -p /run/systemd/inaccessible/dir
        touch /run/systemd/inaccessible/reg
        chmod 0000 /run/systemd/inaccessible/reg /run/systemd/inaccessible/dir
        exec '"$boot"' --keep-unit
    ' > "$work/console.log" 2>&1 || true
fi

if [ ! -f "$tree/root/check.rc" ]; then
    echo "systemd-container-test: the check did not run; the console says:" >&2
    tail -n 40 "$work/console.log" >&2
    exit 1
fi
cat "$tree/root/check.log"
exit "$(cat "$tree/root/check.rc")"
