//! Keeps `--help` true: every sub-command and every argument of `rehost-server` says what it is.

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
        if sub.is_hide_set() {
            continue;
        }
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
    undocumented(&cmd, "rehost-server", &mut missing);
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}

#[test]
fn global_options_are_declared_once_at_the_top() {
    let cmd = super::Cli::command();
    for id in ["data_dir", "admin"] {
        let a = cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("--{id} is not a top-level option"));
        assert!(a.is_global_set(), "--{id} is not global");
    }
    fn no_local_copy(cmd: &clap::Command) {
        for sub in cmd.get_subcommands() {
            for a in sub.get_arguments() {
                assert!(
                    !matches!(a.get_id().as_str(), "data_dir" | "admin"),
                    "`{}` declares --{} again",
                    sub.get_name(),
                    a.get_id()
                );
            }
            no_local_copy(sub);
        }
    }
    no_local_copy(&cmd);
}
