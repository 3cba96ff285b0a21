# Diagnostics for the two-VM TCP transfer in the lab (the lab test
# two_vms_on_a_bridge_ping_each_other_and_move_100_mib_over_tcp, with state dumps).
# Usage, from the repository:
#   target/vhpc lab run --smp 2 --timeout 1500 -- "$(cat scripts/diag/two-vm-transfer.sh)"
# Every 150 s from 200 s into the transfer (and once at the end) it prints the TAPs' counters,
# each guest's virtio interrupts, eth0 counters, last kernel lines and TCP sockets, the VMM
# threads' states and wait channels, and the end of each vmm.log. For a transfer that stalls
# or a guest that dies.
brctl addbr br0 && ip link set br0 up
t() { cut -d' ' -f1 /proc/uptime; }
vhpc vm start a --memory 384 --net bridge=br0 || exit 1
vhpc vm start b --memory 384 --net bridge=br0 || exit 1
vhpc exec a -- sh -c 'ip addr add 10.0.0.1/24 dev eth0 && ip link set eth0 up'
vhpc exec b -- sh -c 'ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up'
vhpc exec a -- ping -c 3 -W 5 10.0.0.2 | tail -1
vhpc exec a -- sh -c 'dd if=/dev/urandom of=/tmp/data bs=64k count=1600 2>/dev/null'
vhpc exec a -- sh -c 'sha256sum < /tmp/data' | sed 's/ .*//; s/^/sum_a=/'
vhpc exec b -- sh -c '(sleep 3600 | nc -l -p 5000 | sha256sum > /tmp/sum) > /dev/null 2>&1 &'
sleep 1
t0=$(t)
diag() {
  echo "##### diag at $(t)"
  for d in vhpc-a-0 vhpc-b-0; do echo "$d: rx $(cat /sys/class/net/$d/statistics/rx_packets) tx $(cat /sys/class/net/$d/statistics/tx_packets) rxdrop $(cat /sys/class/net/$d/statistics/rx_dropped) txdrop $(cat /sys/class/net/$d/statistics/tx_dropped)"; done
  for v in a b; do
    echo "== guest $v"; timeout 20 vhpc exec $v -- sh -c 'grep -i virtio /proc/interrupts; for f in rx_packets tx_packets rx_dropped tx_dropped; do echo eth0 $f $(cat /sys/class/net/eth0/statistics/$f); done; dmesg | tail -8; cat /proc/net/snmp | grep -A1 Tcp: | tail -1; netstat -tn 2>/dev/null | tail -3'
    pid=$(cat /run/vhpc/$v/pid); echo "vmm $v pid $pid"; for tsk in /proc/$pid/task/*; do echo "  $(cat $tsk/comm) $(cut -d' ' -f3 $tsk/stat) wchan=$(cat $tsk/wchan) utime=$(cut -d' ' -f14 $tsk/stat)"; done
    tail -5 /run/vhpc/$v/vmm.log
  done
}
( sleep 200; while true; do diag; sleep 150; done ) &
mon=$!
vhpc exec a -- sh -c 'nc 10.0.0.2 5000 < /tmp/data'; echo send=$? at $(t)
i=0; while [ $i -lt 100 ]; do s=$(vhpc exec b -- cat /tmp/sum 2>/dev/null); [ -n "$s" ] && break; sleep 0.5; i=$((i+1)); done
kill $mon
echo sum_b=${s%% *}
echo transfer_secs=$(awk "BEGIN{print $(t)-$t0}")
diag
vhpc vm list
vhpc vm stop a; vhpc vm stop b
