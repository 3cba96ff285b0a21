# Repeats the two-VM 100 MiB TCP transfer of the lab test
# two_vms_on_a_bridge_ping_each_other_and_move_100_mib_over_tcp up to eight times in one
# emulated host, with the emulated host's KVM tracing on (exits, injected interrupts and
# exceptions, MMIO), and stops at the first guest that dies or transfer that stalls.
# For a guest that died it prints the last 300 KVM events of its vCPU thread: the last exits
# before the SHUTDOWN exit say what the guest was doing (KVM resets a vCPU on a shutdown, so
# its registers are gone). The guests boot with nokaslr, so kernel addresses in the trace can
# be looked up in /proc/kallsyms of any guest of the same kernel.
# Usage, from the repository:
#   target/vhpc lab run --smp 2 --timeout 2800 -- "$(cat scripts/diag/two-vm-trace.sh)"
# To hunt for a stall past the guests' deaths, which are more frequent: prefix the script with
# `until=stall;` (a dead guest's trace is dumped, the VM started again, and the transfers go
# on, up to 16 of them).
T=/sys/kernel/tracing
until=${until:-death}
mount -t tracefs nodev $T 2>/dev/null
echo 16384 > $T/buffer_size_kb
# Lines are tagged comm-tid; a tid whose comm fell out of this cache shows as <...>-tid.
echo 4096 > $T/saved_cmdlines_size
for e in kvm_exit kvm_inj_exception kvm_msi_set_irq kvm_apic_accept_irq kvm_inj_virq \
    kvm_page_fault kvm_emulate_insn kvm_mmio kvm_pio kvm_userspace_exit; do
  echo 1 > $T/events/kvm/$e/enable || echo "no trace event $e"
done
echo 1 > $T/tracing_on
brctl addbr br0 && ip link set br0 up
t() { cut -d' ' -f1 /proc/uptime; }
# Starts VM $1 (a or b, with address 10.0.0.1 or .2) and notes its vCPU thread id: trace
# lines are tagged comm-tid.
start() {
  vhpc vm start $1 --memory 384 --net bridge=br0 --append nokaslr || exit 1
  for tsk in /proc/$(cat /run/vhpc/$1/pid)/task/*; do
    [ "$(cat $tsk/comm)" = vcpu0 ] && eval tid_$1=${tsk##*/}
  done
  ip=10.0.0.1; [ $1 = b ] && ip=10.0.0.2
  vhpc exec $1 -- sh -c "ip addr add $ip/24 dev eth0 && ip link set eth0 up"
  if [ $1 = a ]; then
    vhpc exec a -- sh -c 'dd if=/dev/urandom of=/tmp/data bs=64k count=1600 2>/dev/null'
    vhpc exec a -- sh -c 'sha256sum < /tmp/data' | sed 's/ .*//; s/^/sum_a=/'
  fi
  eval echo "VM $1 runs, vcpu0 thread id \$tid_$1"
}
start a; start b
vhpc exec a -- ping -c 3 -W 5 10.0.0.2 | tail -1
dead() { vhpc vm list | grep -q ' dead '; }
dump() {
  echo 0 > $T/tracing_on
  vhpc vm list
  for v in a b; do
    tid=$(eval echo \$tid_$v)
    echo "== KVM trace of $v (vcpu0, thread $tid)"; grep -E -- "-$tid +\[[0-9]+\]" $T/trace | tail -300
    echo "== vmm.log $v"; tail -8 /run/vhpc/$v/vmm.log
    echo "== console $v"; tail -20 /run/vhpc/$v/console.log
  done
}
# After a stall: checkpoint VM $1 and print where its vCPU was and the last 16 entries of the
# top-level page table its CR3 names (the kernel's half; the trace of a stall showed one of
# them pointing outside guest memory).
postmortem() {
  vhpc snapshot $1 /root/pm-$1 > /dev/null || { echo "checkpoint of $1 failed"; return; }
  vhpc snapshot inspect /root/pm-$1 | grep '^vcpu'
  cr3=$(vhpc snapshot inspect /root/pm-$1 | sed -n 's/.* cr3=\(0x[0-9a-f]*\).*/\1/p')
  page=$(( (cr3 & ~0xfff) / 4096 ))
  echo "== $1: top-level page table at guest page $page, entries 496-511:"
  dd if=/root/pm-$1/memory.raw bs=4096 skip=$page count=1 2>/dev/null | od -A d -t x8 -v | tail -9
}
for n in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
  [ $until = death ] && [ $n -gt 8 ] && break
  vhpc exec b -- sh -c 'rm -f /tmp/sum; (sleep 3600 | nc -l -p 5000 | sha256sum > /tmp/sum) > /dev/null 2>&1 &'
  sleep 1
  t0=$(t)
  vhpc exec a -- sh -c 'nc 10.0.0.2 5000 < /tmp/data' & send=$!
  w=0
  while kill -0 $send 2>/dev/null && [ $w -lt 120 ] && ! dead; do sleep 2; w=$((w+1)); done
  if dead; then
    echo "a VM died in transfer $n at $(t)"; dump; kill $send 2>/dev/null
    [ $until = death ] && break
    for v in a b; do
      vhpc vm list | grep -q "^$v .* dead " && { vhpc vm stop $v >/dev/null 2>&1; start $v; }
    done
    echo 1 > $T/tracing_on
    continue
  fi
  if kill -0 $send 2>/dev/null; then
    echo "transfer $n stalled at $(t)"; dump; postmortem a; postmortem b; kill $send; break
  fi
  wait $send; echo "transfer $n send=$?"
  i=0
  while [ $i -lt 100 ]; do
    s=$(vhpc exec b -- cat /tmp/sum 2>/dev/null); [ -n "$s" ] && break; sleep 0.5; i=$((i+1))
  done
  echo "transfer $n sum_b=${s%% *} secs=$(awk "BEGIN{print $(t)-$t0}")"
done
vhpc vm list
