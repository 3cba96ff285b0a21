//! Finds, in `objdump -d` output, the instructions an emulating KVM backend (kvm_pvm) kills a
//! guest for: anything touching x87, MMX, SSE or AVX state, and `int3`, `xgetbv`, `vmmcall`.
//! Shared by build.rs (which refuses to produce such a guest) and the unit tests.

/// Mnemonics that need no x87/SSE register operand but are still forbidden.
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "int3", "xgetbv", "xsetbv", "vmmcall", "vmcall", "ldmxcsr", "stmxcsr", "emms", "movnti",
    "mfence", "lfence", "sfence", "xsave", "xsaves", "xsavec", "xsaveopt", "xrstor", "xrstors",
    "(bad)",
];

/// Register names that only x87/MMX/SSE/AVX instructions use.
const FORBIDDEN_REGISTERS: &[&str] = &["%xmm", "%ymm", "%zmm", "%mm", "%st", "%k"];

/// Disassembles the guest with objdump, the 64-bit code (section .text) and the 32-bit PVH
/// entry (section .text32) each as what it is, and returns the forbidden instructions.
pub fn check_elf(elf: &std::path::Path) -> Result<Vec<String>, String> {
    let mut bad = Vec::new();
    for args in [
        &["-d", "-j", ".text"][..],
        &["-d", "-j", ".text32", "-m", "i386"][..],
    ] {
        let output = std::process::Command::new("objdump")
            .args(args)
            .arg("--no-show-raw-insn")
            .arg(elf)
            .output()
            .map_err(|e| format!("cannot run objdump ({e}): install binutils"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !text.contains(">:") {
            return Err(format!("objdump {args:?} {} found no code", elf.display()));
        }
        bad.extend(find_forbidden(&text));
    }
    Ok(bad)
}

/// The disassembly lines with a forbidden instruction.
pub fn find_forbidden(disassembly: &str) -> Vec<String> {
    disassembly
        .lines()
        .filter(|line| is_forbidden(line))
        .map(|line| line.trim().to_string())
        .collect()
}

fn is_forbidden(line: &str) -> bool {
    // Instruction lines look like "  100000:\tcli" or "  100004:\tmov    %ebx,%edi".
    let Some((address, insn)) = line.split_once(":\t") else {
        return false;
    };
    if address.trim().is_empty() || !address.trim().chars().all(|c| c.is_ascii_hexdigit()) {
        return false;
    }
    let mut words = insn.split_whitespace();
    let mut mnemonic = words.next().unwrap_or("");
    // Prefixes objdump prints as separate words.
    while matches!(
        mnemonic,
        "lock" | "rep" | "repz" | "repnz" | "data16" | "addr32" | "rex.W"
    ) || mnemonic.starts_with("rex")
    {
        mnemonic = words.next().unwrap_or("");
    }
    let operands: String = words.collect::<Vec<_>>().join(" ");
    let x87 = mnemonic.starts_with('f') && mnemonic != "fs";
    x87 || FORBIDDEN_MNEMONICS.contains(&mnemonic)
        || FORBIDDEN_REGISTERS.iter().any(|r| operands.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn general_register_code_passes() {
        let text = "Disassembly of section .text:\n\n0000000000100000 <pvh_entry>:\n  100000:\tcli\n  100001:\tmov    %ebx,%edi\n  100003:\tlock xadd %rax,0x1c0018\n  10000c:\tmov    %fs:0x28,%rax\n  100010:\trep stos %rax,%es:(%rdi)\n";
        assert_eq!(find_forbidden(text), Vec::<String>::new());
    }

    #[test]
    fn sse_x87_and_traps_are_found() {
        let text = "  100000:\tmovaps %xmm0,(%rsp)\n  100004:\tpxor   %mm1,%mm1\n  100008:\tfldt   0x10(%rsp)\n  10000c:\tint3\n  10000d:\txgetbv\n  100010:\tvmovdqu %ymm0,(%rdi)\n  100014:\tfnstcw (%rsp)\n  100018:\tstmxcsr (%rsp)\n";
        assert_eq!(find_forbidden(text).len(), 8);
    }

    #[test]
    fn headers_and_labels_are_not_instructions() {
        let text =
            "guest.elf:     file format elf64-x86-64\n0000000000100000 <fxsave_like_label>:\n";
        assert!(find_forbidden(text).is_empty());
    }
}
