//! What the host's KVM can do: hardware-assisted, or a software backend (kvm_pvm) that runs
//! only guests without FPU/SSE code, or none at all.

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// /dev/kvm backed by VMX or SVM.
    Hardware,
    /// /dev/kvm served by kvm_pvm, which emulates every guest instruction and kills a guest on
    /// its first x87/SSE/AVX instruction: stock Linux kernels cannot boot on it.
    Pvm,
    /// No usable /dev/kvm.
    Missing,
}

/// Classifies this host's KVM.
pub fn kvm_kind() -> KvmKind {
    classify(
        Path::new("/dev/kvm").exists(),
        Path::new("/sys/module/kvm_pvm").exists(),
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
    )
}

fn classify(dev_kvm: bool, pvm_module: bool, cpuinfo: &str) -> KvmKind {
    if !dev_kvm {
        return KvmKind::Missing;
    }
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if pvm_module || !hw {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

/// Host RAM in MiB (MemTotal).
pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_memtotal_kib(&s))
        .map_or(0, |kib| kib / 1024)
}

fn parse_memtotal_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_hosts() {
        let svm = "processor: 0\nflags\t\t: fpu sse svm lm\n";
        let none = "flags\t\t: fpu sse lm\n";
        assert_eq!(classify(true, false, svm), KvmKind::Hardware);
        assert_eq!(classify(true, true, svm), KvmKind::Pvm);
        assert_eq!(classify(true, false, none), KvmKind::Pvm);
        assert_eq!(classify(false, false, svm), KvmKind::Missing);
    }

    #[test]
    fn parses_memtotal() {
        let m = "MemTotal:       24591264 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_memtotal_kib(m), Some(24_591_264));
        assert_eq!(parse_memtotal_kib("nothing"), None);
    }
}
