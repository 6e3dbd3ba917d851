//! Keeps `--help` true: every sub-command and every argument of `rehost-agent` says what it is.

use clap::CommandFactory as _;

/// Names `cmd`'s arguments and sub-commands (recursively) that have no help text.
fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for a in cmd.get_arguments() {
        if a.is_hide_set() || a.get_help().is_some() || a.get_long_help().is_some() {
            continue;
        }
        out.push(format!("{path} {}", a.get_id()));
    }
    for sub in cmd.get_subcommands() {
        let p = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none() && sub.get_long_about().is_none() {
            out.push(p.clone());
        }
        undocumented(sub, &p, out);
    }
}

#[test]
fn every_argument_and_sub_command_has_help() {
    let cmd = super::Cli::command();
    cmd.clone().debug_assert();
    let mut missing = Vec::new();
    undocumented(&cmd, "rehost-agent", &mut missing);
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}
