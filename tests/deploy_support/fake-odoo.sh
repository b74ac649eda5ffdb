#!/bin/sh
# Odoo-like server for the deploy tests: accepts the options the agent passes to odoo,
# logs in Odoo's format, and serves /web/health and /web/version with busybox httpd.
# FAKE_ODOO_MODE, set in the image, chooses the behaviour:
#   healthy        serve, /web/health returns 200
#   unhealthy      serve, /web/health returns 404
#   crash          exit 3 one second after start
#   fail_update    -u logs ERROR and CRITICAL lines and exits 255
#   update_error   -u logs an ERROR line but exits 0
#   leak_secrets   logs $PASSWORD, $DB_TOKEN and $INLINE at start; -u also logs an ERROR
#                  line with $PASSWORD and exits 255; serves as unhealthy does
set -eu
mode=${FAKE_ODOO_MODE:-healthy}
version=${FAKE_ODOO_VERSION:-unknown}
update=""
stop_after_init=0
db=odoo

log() {
    echo "$(date -u '+%Y-%m-%d %H:%M:%S'),000 $$ $1 $db $2: $3" >&2
}

while [ $# -gt 0 ]; do
    case $1 in
        -u) update=$2; shift ;;
        -d) db=$2; shift ;;
        -c) shift ;;
        --stop-after-init) stop_after_init=1 ;;
        --no-http | --max-cron-threads=*) ;;
        *) echo "odoo: error: no such option: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$mode" = leak_secrets ]; then
    log INFO odoo.sql_db "connecting with password ${PASSWORD:-} token ${DB_TOKEN:-}"
    log INFO odoo.sql_db "inline setting ${INLINE:-}"
fi
if [ -n "$update" ]; then
    log INFO odoo.modules.loading "updating modules $update"
    echo "$update" >>/var/lib/odoo/updates.log
    case $mode in
        fail_update)
            log ERROR odoo.modules.registry "Failed to load registry"
            log CRITICAL odoo.service.server "Failed to initialize database \`$db\`."
            exit 255
            ;;
        leak_secrets)
            log ERROR odoo.sql_db "password ${PASSWORD:-} rejected"
            exit 255
            ;;
        update_error)
            log ERROR odoo.modules.loading "module odooops_sample: field missing"
            ;;
    esac
    log INFO odoo.modules.loading "Modules loaded."
fi
if [ "$stop_after_init" = 1 ]; then
    exit 0
fi

log INFO odoo.service.server "HTTP service (werkzeug) running on 0.0.0.0:8069 ($version)"
mkdir -p /var/www/web /var/lib/odoo/filestore
echo "$version" >/var/www/web/version
if [ "$mode" != unhealthy ] && [ "$mode" != leak_secrets ]; then
    echo '{"status": "pass"}' >/var/www/web/health
fi
if [ "$mode" = crash ]; then
    sleep 1
    log CRITICAL odoo.service.server "crashing as FAKE_ODOO_MODE=crash asks"
    exit 3
fi
httpd -f -p 0.0.0.0:8069 -h /var/www &
server=$!
# PID 1 gets no default SIGTERM action, so the shell forwards it.
trap 'kill -TERM $server; wait $server; exit 0' TERM INT
wait $server
