//! The kernel modules the lab needs, with their dependencies, in load order. Debian's cloud
//! kernels build veth, the bridge and netfilter as modules, and nothing in the VM loads
//! modules on demand, so the guest's init loads these with insmod.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context, Result};

/// What the lab uses: veth pairs on a bridge; iptables-nft's nat table with the matches and the
/// target of istio-init's rules (the iptables capture mode). Dependencies come from modules.dep.
const LAB_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "nf_tables",
    "nft_chain_nat",
    "nft_compat",
    "nft_counter",
    "xt_REDIRECT",
    "xt_owner",
    "xt_multiport",
    "xt_tcpudp",
];

/// The modules to load for one kernel.
pub struct ModulePlan {
    /// Paths relative to the modules directory, each after its dependencies.
    pub load_order: Vec<String>,
    /// Lab modules this kernel has neither as a module nor built in: folded into another
    /// module (nft_counter is part of nf_tables since 6.0), or absent.
    pub not_modules: Vec<&'static str>,
}

/// Reads `modules.dep` and `modules.builtin` (written by depmod) in `modules_dir`.
pub fn plan(modules_dir: &Path) -> Result<ModulePlan> {
    let read = |name: &str| {
        let path = modules_dir.join(name);
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let dependencies = parse_modules_dep(&read("modules.dep")?);
    let builtin: BTreeSet<String> = read("modules.builtin")?.lines().map(module_name).collect();
    let by_name: BTreeMap<String, &str> = dependencies
        .keys()
        .map(|path| (module_name(path), path.as_str()))
        .collect();
    let mut plan = ModulePlan {
        load_order: Vec::new(),
        not_modules: Vec::new(),
    };
    let mut visited = BTreeSet::new();
    for &wanted in LAB_MODULES {
        match by_name.get(&module_name(wanted)) {
            Some(path) => {
                add_with_dependencies(path, &dependencies, &mut visited, &mut plan.load_order)
            }
            None if builtin.contains(&module_name(wanted)) => {}
            None => plan.not_modules.push(wanted),
        }
    }
    Ok(plan)
}

/// `path: dependency dependency...` per line.
fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, dependencies)| {
            let dependencies = dependencies.split_whitespace().map(str::to_owned).collect();
            (module.trim().to_owned(), dependencies)
        })
        .collect()
}

/// Depth first: every dependency is listed before the module that needs it.
fn add_with_dependencies(
    path: &str,
    dependencies: &BTreeMap<String, Vec<String>>,
    visited: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !visited.insert(path.to_owned()) {
        return;
    }
    for dependency in dependencies.get(path).into_iter().flatten() {
        add_with_dependencies(dependency, dependencies, visited, order);
    }
    order.push(path.to_owned());
}

/// `kernel/net/bridge/bridge.ko.xz` -> `bridge`; the kernel treats `-` and `_` alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES_DEP: &str = "\
kernel/drivers/net/veth.ko.xz:
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/llc/llc.ko.xz:
kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz
kernel/net/netfilter/nfnetlink.ko.xz:
kernel/net/netfilter/nft_compat.ko.xz: kernel/net/netfilter/x_tables.ko.xz kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz
kernel/net/netfilter/x_tables.ko.xz:
kernel/net/netfilter/xt_owner.ko.xz: kernel/net/netfilter/x_tables.ko.xz
";

    #[test]
    fn orders_dependencies_first_without_duplicates() {
        let deps = parse_modules_dep(MODULES_DEP);
        let mut visited = BTreeSet::new();
        let mut order = Vec::new();
        for module in [
            "kernel/net/bridge/bridge.ko.xz",
            "kernel/net/netfilter/nft_compat.ko.xz",
            "kernel/net/netfilter/xt_owner.ko.xz",
        ] {
            add_with_dependencies(module, &deps, &mut visited, &mut order);
        }
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "llc",
                "stp",
                "bridge",
                "x_tables",
                "nfnetlink",
                "nf_tables",
                "nft_compat",
                "xt_owner"
            ]
        );
    }

    #[test]
    fn plans_from_depmod_files_and_skips_builtins() {
        let dir = std::env::temp_dir().join(format!("vm-modules-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("modules.dep"), MODULES_DEP).unwrap();
        fs::write(
            dir.join("modules.builtin"),
            "kernel/net/netfilter/xt_tcpudp.ko\n",
        )
        .unwrap();
        let plan = plan(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            plan.load_order.first().unwrap(),
            "kernel/drivers/net/veth.ko.xz"
        );
        assert!(
            plan.load_order
                .contains(&"kernel/net/llc/llc.ko.xz".to_owned())
        );
        assert!(!plan.not_modules.contains(&"xt_tcpudp"), "built in");
        assert!(plan.not_modules.contains(&"nft_counter"));
    }

    #[test]
    fn names_modules_like_the_kernel() {
        assert_eq!(module_name("kernel/net/bridge/bridge.ko.xz"), "bridge");
        assert_eq!(
            module_name("kernel/crypto/crc32c-generic.ko"),
            "crc32c_generic"
        );
        assert_eq!(module_name("xt_REDIRECT"), "xt_REDIRECT");
    }
}
