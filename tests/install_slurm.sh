#!/usr/bin/env bash
# Installs Debian's Slurm daemons for the `slurm` tests (run as root). The tests start their own
# slurmctld/slurmd with their own config; the packages' init scripts must not start the stock ones.
set -euo pipefail
pkgs="slurmctld slurmd slurm-client"
if dpkg-query -W -f='${Status}\n' $pkgs 2>/dev/null | grep -vq "install ok installed" || \
   ! dpkg-query -W $pkgs >/dev/null 2>&1; then
    made=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 $pkgs >/dev/null
    [ "$made" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
echo "slurm $(dpkg-query -W -f='${Version}' slurmctld) installed"
