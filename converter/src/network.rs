//! Network configuration to DHCP on the new NIC, MAC-bound names removed, and source-hypervisor guest
//! tools disabled.
//!
//! ifupdown stanzas are edited line by line (static -> dhcp, static-only options dropped, predictable
//! names such as `ens192` renamed to `eth0` since `net.ifnames=0` is added to the kernel command line);
//! netplan, systemd-networkd and NetworkManager static or MAC-matched profiles are set aside as
//! `*.rehost-orig` (which those tools ignore) or edited, with one DHCP profile in their place.

use crate::fstab::{field_spans, LineEdit};
use crate::guestfs::{EntryKind, GuestError, GuestRoot};
use crate::report::Change;

const STATIC_ONLY: &[&str] = &[
    "address",
    "netmask",
    "gateway",
    "broadcast",
    "network",
    "pointopoint",
    "hwaddress",
    "dns-nameservers",
    "dns-search",
    "dns-domain",
    "scope",
];

fn is_classic(name: &str) -> bool {
    name.strip_prefix("eth")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Append `line` (and its newline `nl`) to `out` as `change` says: unchanged when None, else
/// replaced by the new text or, without one, removed, with the edit recorded.
fn put_line(
    out: &mut String,
    edits: &mut Vec<LineEdit>,
    line: &str,
    nl: &str,
    change: Option<(Option<String>, String)>,
) {
    match change {
        Some((repl, detail)) => {
            edits.push(LineEdit {
                old: line.to_string(),
                new: repl.clone().unwrap_or_default(),
                detail,
            });
            if let Some(r) = repl {
                out.push_str(&r);
                out.push_str(nl);
            }
        }
        None => {
            out.push_str(line);
            out.push_str(nl);
        }
    }
}

/// Rewrite an ifupdown interfaces file. Returns the new text, the edits, and whether any non-loopback
/// interface is configured (then `net.ifnames=0` keeps the `ethN` names it uses).
pub fn rewrite_interfaces(text: &str) -> (String, Vec<LineEdit>, bool) {
    // Names to rename: predictable names get the first free ethN, in order of appearance.
    let mut renames: Vec<(String, String)> = Vec::new();
    let mut used: Vec<String> = Vec::new();
    let mut any_iface = false;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"iface") && f.len() >= 2 && f[1] != "lo" {
            any_iface = true;
            if is_classic(f[1]) {
                used.push(f[1].to_string());
            }
        }
    }
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"iface")
            && f.len() >= 2
            && f[1] != "lo"
            && !is_classic(f[1])
            && !f[1].contains(':')
        {
            if renames.iter().any(|(a, _)| a == f[1]) {
                continue;
            }
            let n = (0..)
                .map(|i| format!("eth{i}"))
                .find(|c| !used.contains(c))
                .unwrap_or_default();
            used.push(n.clone());
            renames.push((f[1].to_string(), n));
        }
    }
    let rename = |n: &str| renames.iter().find(|(a, _)| a == n).map(|(_, b)| b.clone());
    let mut out = String::with_capacity(text.len());
    let mut edits = Vec::new();
    let mut in_dhcp_stanza = false;
    for piece in text.split_inclusive('\n') {
        let (line, nl) = piece.strip_suffix('\n').map_or((piece, ""), |l| (l, "\n"));
        let spans = field_spans(line);
        let words: Vec<&str> = spans.iter().map(|&(a, b)| &line[a..b]).collect();
        let first = words.first().copied().unwrap_or("");
        let mut new: Option<(Option<String>, String)> = None;
        match first {
            "iface" | "mapping" | "auto" | "allow-hotplug" | "source" | "source-directory"
            | "rename" => {
                in_dhcp_stanza = false;
                if first == "iface" && words.len() >= 4 && words[1] != "lo" {
                    let name = rename(words[1]).unwrap_or_else(|| words[1].to_string());
                    let method = match (words[2], words[3]) {
                        ("inet", "static" | "manual") => "dhcp",
                        ("inet6", "static") => "auto",
                        _ => words[3],
                    };
                    in_dhcp_stanza = method != words[3] || words[3] == "dhcp" || words[3] == "auto";
                    if method != words[3] || name != words[1] {
                        let rest: Vec<&str> = words[4..].to_vec();
                        let mut l = format!(
                            "{}iface {} {} {}",
                            &line[..spans[0].0],
                            name,
                            words[2],
                            method
                        );
                        for r in rest {
                            l.push(' ');
                            l.push_str(r);
                        }
                        new = Some((
                            Some(l),
                            format!(
                                "{} {} {} -> {} {}",
                                words[1], words[2], words[3], name, method
                            ),
                        ));
                    }
                } else if (first == "auto" || first == "allow-hotplug")
                    && words.iter().skip(1).any(|w| rename(w).is_some())
                {
                    let names: Vec<String> = words[1..]
                        .iter()
                        .map(|w| rename(w).unwrap_or_else(|| w.to_string()))
                        .collect();
                    let l = format!("{}{} {}", &line[..spans[0].0], first, names.join(" "));
                    new = Some((
                        Some(l),
                        "renamed to the name the NIC gets with net.ifnames=0".into(),
                    ));
                }
            }
            w if in_dhcp_stanza && STATIC_ONLY.contains(&w) => {
                new = Some((
                    None,
                    format!("{w} dropped: the address now comes from DHCP"),
                ));
            }
            _ => {}
        }
        put_line(&mut out, &mut edits, line, nl, new);
    }
    (out, edits, any_iface)
}

/// Rewrite a NetworkManager keyfile: ipv4 method manual -> auto, static addresses, and MAC/interface
/// bindings removed.
pub fn rewrite_nmconnection(text: &str) -> (String, Vec<LineEdit>) {
    let mut out = String::with_capacity(text.len());
    let mut edits = Vec::new();
    let mut section = String::new();
    for piece in text.split_inclusive('\n') {
        let (line, nl) = piece.strip_suffix('\n').map_or((piece, ""), |l| (l, "\n"));
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            section = t[1..t.len() - 1].to_string();
        }
        let key = t.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
        let value = t.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
        let change: Option<(Option<String>, &str)> = match (section.as_str(), key) {
            ("ipv4", "method") if value == "manual" => {
                Some((Some("method=auto".into()), "static -> DHCP"))
            }
            ("ipv4", k) if k.starts_with("address") || k == "gateway" || k == "dns" => {
                Some((None, "static setting dropped"))
            }
            ("ethernet" | "802-3-ethernet", "mac-address") => Some((None, "MAC binding removed")),
            ("connection", "interface-name") => Some((None, "interface binding removed")),
            _ => None,
        };
        let change = change.map(|(repl, detail)| (repl, detail.to_string()));
        put_line(&mut out, &mut edits, line, nl, change);
    }
    (out, edits)
}

/// True when a systemd-networkd/netplan file pins a MAC or a static address (and so must go).
pub fn pins_hardware_or_address(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim_start().to_ascii_lowercase();
        t.starts_with("macaddress")
            || t.starts_with("permanentmacaddress")
            || t.starts_with("address=")
            || t.starts_with("gateway=")
            || t.starts_with("addresses:")
            || t.starts_with("set-name:")
            || t.starts_with("gateway4:")
    })
}

fn edits_to_changes(kind: &str, file: &str, edits: Vec<LineEdit>) -> Vec<Change> {
    edits
        .into_iter()
        .map(|e| {
            Change::new(
                kind,
                file,
                Some(e.old),
                (!e.new.is_empty()).then_some(e.new),
                e.detail,
            )
        })
        .collect()
}

/// Regular files of a guest directory whose names end with `suffix`, sorted.
fn files_in(g: &GuestRoot, dir: &str, suffix: &str) -> Result<Vec<String>, GuestError> {
    Ok(g.list_dir(dir)?
        .unwrap_or_default()
        .into_iter()
        .filter(|(n, k)| n.ends_with(suffix) && matches!(k, EntryKind::File))
        .map(|(n, _)| format!("{dir}/{n}"))
        .collect())
}

/// Set a file aside as `*.rehost-orig` (ignored by the tool that read it).
fn set_aside(
    g: &GuestRoot,
    kind: &str,
    file: &str,
    apply: bool,
    why: &str,
) -> Result<Change, GuestError> {
    let old = g.read_text(file)?;
    let to = format!("{file}.rehost-orig");
    if apply {
        g.rename(file, &to)?;
    }
    Ok(Change::new(
        kind,
        file,
        old,
        None,
        format!("{why}; kept as {to}"),
    ))
}

/// Write the DHCP profile `text` that takes the place of the configurations set aside.
fn dhcp_profile(g: &GuestRoot, file: &str, text: &str, apply: bool) -> Result<Change, GuestError> {
    if apply {
        g.write(file, text.as_bytes())?;
    }
    Ok(Change::new(
        "network",
        file,
        None,
        Some(text.into()),
        "DHCP on the new NIC",
    ))
}

/// What the network pass decided.
#[derive(Debug, Default)]
pub struct NetworkOutcome {
    pub changes: Vec<Change>,
    /// Whether the kernel command line needs `net.ifnames=0`.
    pub want_classic_names: bool,
}

/// Convert the guest's network configuration; with `apply == false` only report what would change.
pub fn convert(g: &GuestRoot, apply: bool) -> Result<NetworkOutcome, GuestError> {
    let mut o = NetworkOutcome::default();
    // ifupdown
    let mut ifupdown = vec!["/etc/network/interfaces".to_string()];
    ifupdown.extend(files_in(g, "/etc/network/interfaces.d", "")?);
    for file in ifupdown {
        let Some(text) = g.read_text(&file)? else {
            continue;
        };
        let (new, edits, any) = rewrite_interfaces(&text);
        o.want_classic_names |= any;
        if !edits.is_empty() {
            if apply {
                g.backup(&file)?;
                g.write(&file, new.as_bytes())?;
            }
            o.changes.extend(edits_to_changes("network", &file, edits));
        }
    }
    // udev persistent-net rules (MAC -> name)
    for file in [
        "/etc/udev/rules.d/70-persistent-net.rules",
        "/etc/udev/rules.d/75-persistent-net-generator.rules",
    ] {
        if g.kind(file)?.is_some() {
            o.changes.push(set_aside(
                g,
                "udev",
                file,
                apply,
                "MAC-bound interface names removed",
            )?);
        }
    }
    // netplan
    let netplan = files_in(g, "/etc/netplan", ".yaml")?;
    let dhcp_plan = "/etc/netplan/90-rehost-dhcp.yaml";
    let mut plan_needed = false;
    for file in netplan.iter().filter(|f| f.as_str() != dhcp_plan) {
        let text = g.read_text(file)?.unwrap_or_default();
        if pins_hardware_or_address(&text) || !text.contains("dhcp4: true") {
            o.changes.push(set_aside(
                g,
                "network",
                file,
                apply,
                "static or MAC-bound netplan config",
            )?);
            plan_needed = true;
        }
    }
    if plan_needed {
        let text = "# written by rehost-converter: DHCP on every Ethernet NIC\nnetwork:\n  version: 2\n  ethernets:\n    all-en:\n      match:\n        name: \"e*\"\n      dhcp4: true\n";
        o.changes.push(dhcp_profile(g, dhcp_plan, text, apply)?);
    }
    // systemd-networkd
    let mut networkd_needed = false;
    let dhcp_net = "/etc/systemd/network/80-rehost-dhcp.network";
    for file in files_in(g, "/etc/systemd/network", ".network")?
        .iter()
        .chain(files_in(g, "/etc/systemd/network", ".link")?.iter())
    {
        if file == dhcp_net {
            continue;
        }
        let text = g.read_text(file)?.unwrap_or_default();
        if pins_hardware_or_address(&text) {
            o.changes.push(set_aside(
                g,
                "network",
                file,
                apply,
                "static or MAC-bound networkd config",
            )?);
            networkd_needed |= file.ends_with(".network");
        }
    }
    if networkd_needed {
        let text = "# written by rehost-converter\n[Match]\nName=e*\n\n[Network]\nDHCP=yes\n";
        o.changes.push(dhcp_profile(g, dhcp_net, text, apply)?);
    }
    // NetworkManager keyfiles
    for file in files_in(g, "/etc/NetworkManager/system-connections", "")? {
        if file.ends_with(".rehost-orig") {
            continue;
        }
        let Some(text) = g.read_text(&file)? else {
            continue;
        };
        let (new, edits) = rewrite_nmconnection(&text);
        if !edits.is_empty() {
            if apply {
                g.backup(&file)?;
                // NetworkManager ignores a keyfile other users can read; keep the file's own mode.
                g.write(&file, new.as_bytes())?;
            }
            o.changes.extend(edits_to_changes("network", &file, edits));
        }
    }
    Ok(o)
}

/// systemd units of the source hypervisors' guest tools.
pub const HYPERVISOR_UNITS: &[&str] = &[
    "open-vm-tools.service",
    "vmtoolsd.service",
    "vgauth.service",
    "vgauthd.service",
    "run-vmblock\\x2dfuse.mount",
    "xe-guest-utilities.service",
    "xe-linux-distribution.service",
    "xe-daemon.service",
    "hv-kvp-daemon.service",
    "hv-vss-daemon.service",
    "hv-fcopy-daemon.service",
    "hyperv-daemons.hv-kvp-daemon.service",
    "hyperv-daemons.hv-vss-daemon.service",
    "hyperv-daemons.hv-fcopy-daemon.service",
    "hypervkvpd.service",
    "hypervvssd.service",
    "hypervfcopyd.service",
    "vboxadd.service",
    "vboxadd-service.service",
];

const SYSV_NAMES: &[&str] = &[
    "open-vm-tools",
    "vmware-tools",
    "xe-linux-distribution",
    "hv-kvp-daemon",
    "vboxadd",
];

/// Remove the enable symlinks of hypervisor guest tools (systemd `*.wants/` and SysV `rc?.d/S*`).
pub fn disable_hypervisor_tools(g: &GuestRoot, apply: bool) -> Result<Vec<Change>, GuestError> {
    let mut changes = Vec::new();
    let mut links = Vec::new();
    for (dir, kind) in g.list_dir("/etc/systemd/system")?.unwrap_or_default() {
        if dir.ends_with(".wants") && kind == EntryKind::Dir {
            for (name, k) in g
                .list_dir(&format!("/etc/systemd/system/{dir}"))?
                .unwrap_or_default()
            {
                if k == EntryKind::Symlink && HYPERVISOR_UNITS.contains(&name.as_str()) {
                    links.push(format!("/etc/systemd/system/{dir}/{name}"));
                }
            }
        }
    }
    for rc in ["rc2.d", "rc3.d", "rc4.d", "rc5.d", "rcS.d"] {
        for (name, k) in g.list_dir(&format!("/etc/{rc}"))?.unwrap_or_default() {
            let base = name.trim_start_matches(|c: char| c == 'S' || c.is_ascii_digit());
            if name.starts_with('S') && k == EntryKind::Symlink && SYSV_NAMES.contains(&base) {
                links.push(format!("/etc/{rc}/{name}"));
            }
        }
    }
    for link in links {
        let target = g.readlink(&link)?;
        if apply {
            g.remove(&link)?;
        }
        changes.push(Change::new(
            "hypervisor-tools",
            &link,
            Some(format!("-> {target}")),
            None,
            "source hypervisor's guest tools disabled",
        ));
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn static_eth0_to_dhcp() {
        let t = "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n\taddress 192.0.2.10/24\n\tgateway 192.0.2.1\n\tmtu 1500\n";
        let (new, edits, any) = rewrite_interfaces(t);
        assert!(any);
        assert_eq!(new, "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n\tmtu 1500\n");
        assert_eq!(edits.len(), 3);
        let (again, e2, _) = rewrite_interfaces(&new);
        assert_eq!(again, new);
        assert!(e2.is_empty());
    }

    #[test]
    fn predictable_name_renamed() {
        let t = "allow-hotplug ens192\niface ens192 inet static\n address 10.1.1.1\niface ens192 inet6 static\n address fd00::1/64\n";
        let (new, _, _) = rewrite_interfaces(t);
        assert_eq!(
            new,
            "allow-hotplug eth0\niface eth0 inet dhcp\niface eth0 inet6 auto\n"
        );
    }

    #[test]
    fn nm_keyfile() {
        let t = "[connection]\nid=x\ninterface-name=ens33\n[ethernet]\nmac-address=00:11:22:33:44:55\n[ipv4]\nmethod=manual\naddress1=10.0.0.5/24,10.0.0.1\ndns=1.1.1.1;\n";
        let (new, edits) = rewrite_nmconnection(t);
        assert_eq!(new, "[connection]\nid=x\n[ethernet]\n[ipv4]\nmethod=auto\n");
        assert_eq!(edits.len(), 5);
    }

    #[test]
    fn pins() {
        assert!(pins_hardware_or_address(
            "[Match]\nMACAddress=00:11:22:33:44:55\n"
        ));
        assert!(pins_hardware_or_address(
            "network:\n  ethernets:\n    eth0:\n      addresses: [10.0.0.2/24]\n"
        ));
        assert!(!pins_hardware_or_address(
            "[Match]\nName=e*\n[Network]\nDHCP=yes\n"
        ));
    }

    #[test]
    fn guest_pass_netplan_networkd_nm_udev_tools() {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, t: &str| {
            let path = d.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, t).unwrap();
        };
        w("/etc/netplan/50-cloud-init.yaml", "network:\n  ethernets:\n    ens5:\n      match:\n        macaddress: 00:11:22:33:44:55\n      addresses: [10.1.0.5/24]\n");
        w(
            "/etc/netplan/60-ok.yaml",
            "network:\n  ethernets:\n    e:\n      dhcp4: true\n",
        );
        w(
            "/etc/systemd/network/10-eth.network",
            "[Match]\nMACAddress=00:11:22:33:44:55\n[Network]\nAddress=10.1.0.5/24\n",
        );
        w(
            "/etc/NetworkManager/system-connections/w.nmconnection",
            "[ipv4]\nmethod=manual\naddress1=10.0.0.5/24\n",
        );
        w(
            "/etc/udev/rules.d/70-persistent-net.rules",
            "SUBSYSTEM==\"net\", NAME=\"eth0\"\n",
        );
        w("/lib/systemd/system/open-vm-tools.service", "[Unit]\n");
        std::fs::create_dir_all(d.path().join("etc/systemd/system/multi-user.target.wants"))
            .unwrap();
        std::os::unix::fs::symlink(
            "/lib/systemd/system/open-vm-tools.service",
            d.path()
                .join("etc/systemd/system/multi-user.target.wants/open-vm-tools.service"),
        )
        .unwrap();
        let g = GuestRoot::open(d.path()).unwrap();
        let plan = convert(&g, false).unwrap();
        assert!(
            d.path().join("etc/netplan/50-cloud-init.yaml").exists(),
            "planning must not write"
        );
        let o = convert(&g, true).unwrap();
        assert_eq!(plan.changes, o.changes);
        let files: Vec<&str> = o.changes.iter().map(|c| c.file.as_str()).collect();
        assert!(files.contains(&"/etc/netplan/50-cloud-init.yaml"));
        assert!(!files.contains(&"/etc/netplan/60-ok.yaml"));
        assert!(d
            .path()
            .join("etc/netplan/50-cloud-init.yaml.rehost-orig")
            .exists());
        assert!(d.path().join("etc/netplan/90-rehost-dhcp.yaml").exists());
        assert!(d
            .path()
            .join("etc/systemd/network/10-eth.network.rehost-orig")
            .exists());
        assert!(d
            .path()
            .join("etc/systemd/network/80-rehost-dhcp.network")
            .exists());
        assert!(d
            .path()
            .join("etc/udev/rules.d/70-persistent-net.rules.rehost-orig")
            .exists());
        let nm = std::fs::read_to_string(
            d.path()
                .join("etc/NetworkManager/system-connections/w.nmconnection"),
        )
        .unwrap();
        assert_eq!(nm, "[ipv4]\nmethod=auto\n");
        let tools = disable_hypervisor_tools(&g, true).unwrap();
        assert_eq!(tools.len(), 1);
        assert!(!d
            .path()
            .join("etc/systemd/system/multi-user.target.wants/open-vm-tools.service")
            .exists());
        assert!(d
            .path()
            .join("lib/systemd/system/open-vm-tools.service")
            .exists());
        // A second pass finds nothing left to do.
        assert!(convert(&g, true).unwrap().changes.is_empty());
        assert!(disable_hypervisor_tools(&g, true).unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn random_interfaces_never_panic(text in "[ -~\\t\\n]{0,300}") {
            let (a, _, _) = rewrite_interfaces(&text);
            let (b, e, _) = rewrite_interfaces(&a);
            prop_assert_eq!(a, b);
            prop_assert!(e.is_empty());
            let _ = rewrite_nmconnection(&text);
        }
    }
}
