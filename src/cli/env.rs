//! The environment as the command line reads it: a bad value that came from a `RINGPUSH_*`
//! variable is reported under the variable's name (clap names the flag, which the person did
//! not type), and a `RINGPUSH_*` variable no command reads — a likely typo, silently ignored
//! otherwise — is warned about at start with the nearest known name.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches};

use super::Cli;

/// Every `RINGPUSH_*` variable some command reads, sorted.
pub fn known_variables() -> Vec<String> {
    let mut command = Cli::command();
    command.build();
    let mut known = Vec::new();
    let mut stack = vec![&command];
    while let Some(c) = stack.pop() {
        for arg in c.get_arguments() {
            if let Some(var) = arg.get_env().and_then(|v| v.to_str()) {
                known.push(var.to_owned());
            }
        }
        stack.extend(c.get_subcommands());
    }
    known.sort();
    known.dedup();
    known
}

/// The `RINGPUSH_*` names among `vars` that no command reads, each with the known name
/// nearest to it when one is near enough to be what was meant.
pub fn unknown_variables(vars: impl IntoIterator<Item = String>) -> Vec<(String, Option<String>)> {
    let known = known_variables();
    let mut unknown: Vec<(String, Option<String>)> = vars
        .into_iter()
        .filter(|v| v.starts_with("RINGPUSH_") && !known.contains(v))
        .map(|v| {
            let near = crate::human::nearest(&v, known.iter().map(String::as_str));
            let near = near.map(str::to_owned);
            (v, near)
        })
        .collect();
    unknown.sort();
    unknown
}

/// Logs a warning for each `RINGPUSH_*` variable of this process's environment that no
/// command reads (target `ringpush::cli`, which the person-facing commands let through at
/// warn).
pub fn warn_unknown_variables() {
    let vars = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    for (var, near) in unknown_variables(vars) {
        match near {
            Some(near) => tracing::warn!(
                "{var} is set, but no ringpush command reads it: a typo of {near}?"
            ),
            None => tracing::warn!(
                "{var} is set, but no ringpush command reads it (`ringpush <command> --help` lists the variables)"
            ),
        }
    }
}

impl Cli {
    /// Parses the process's arguments and environment like `Cli::parse`, but an invalid value
    /// that came from a variable (its flag not on the command line) names the variable:
    /// `RINGPUSH_MQTT_INGRESS=yes` is reported as `RINGPUSH_MQTT_INGRESS`, not as
    /// `--mqtt-ingress`. Exits as clap does on `--help` and on errors.
    pub fn parse_env() -> Cli {
        let args: Vec<OsString> = std::env::args_os().collect();
        match Self::try_parse_env(&args) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        }
    }

    /// [`Cli::parse_env`] of `args`, with the process's environment.
    pub fn try_parse_env(args: &[OsString]) -> Result<Cli, clap::Error> {
        let mut command = Cli::command();
        let matches = command.try_get_matches_from_mut(args.iter().cloned());
        let error = match matches.and_then(|m| Cli::from_arg_matches(&m)) {
            Ok(cli) => return cli.checked(),
            Err(e) => e,
        };
        if !matches!(
            error.kind(),
            ErrorKind::InvalidValue | ErrorKind::ValueValidation
        ) {
            return Err(error);
        }
        let Some(ContextValue::String(shown)) = error.get(ContextKind::InvalidArg) else {
            return Err(error);
        };
        // `--log-format <LOG_FORMAT>` → `--log-format`.
        let flag = shown.split(' ').next().unwrap_or_default().to_owned();
        let typed = args.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        let var = variable_of(&mut command, &flag);
        match var {
            Some(var) if !typed && std::env::var_os(&var).is_some() => {
                let text = error.render().to_string();
                if text.contains(&var) {
                    return Err(error);
                }
                // `invalid value 'yes' for '--mqtt-ingress'` → `… for RINGPUSH_MQTT_INGRESS`.
                let text = text.replacen(&format!("'{shown}'"), &format!("{var} ({flag})"), 1);
                let text = text.strip_prefix("error: ").unwrap_or(&text).to_owned();
                Err(clap::Error::raw(ErrorKind::ValueValidation, text))
            }
            _ => Err(error),
        }
    }
}

impl Cli {
    /// What a value parser cannot check without showing the value in its error (clap prints
    /// the value, and a URL holds a password): the broker URL is an AMQP URL.
    fn checked(self) -> Result<Cli, clap::Error> {
        if let Some(url) = self.command.amqp_url() {
            if let Err(e) = crate::broker::cause::check_url(url) {
                let text = format!("RINGPUSH_AMQP_URL: {e}\n");
                return Err(clap::Error::raw(ErrorKind::ValueValidation, text));
            }
        }
        Ok(self)
    }
}

impl super::Command {
    /// The broker URL the command connects with, if it connects to the broker.
    fn amqp_url(&self) -> Option<&str> {
        use super::{Command, GatewayCommand};
        let url = match self {
            Command::Worker(a) => &a.broker.amqp_url,
            Command::Feedback(a) => &a.broker.amqp_url,
            Command::Purge(a) => &a.broker.amqp_url,
            Command::Ring(a) => &a.broker.amqp_url,
            Command::Queues(a) => &a.broker.amqp_url,
            Command::Gateway(GatewayCommand::Add(a)) => &a.password.id.management.broker.amqp_url,
            Command::Gateway(GatewayCommand::Rotate(a)) => &a.id.management.broker.amqp_url,
            Command::Gateway(GatewayCommand::Remove(a)) => &a.management.broker.amqp_url,
            Command::Gateway(GatewayCommand::List(a)) => &a.broker.amqp_url,
            #[cfg(feature = "kit")]
            Command::Demo(a) => &a.local.amqp_url,
            #[cfg(feature = "kit")]
            Command::Bench(a) => &a.local.amqp_url,
            _ => return None,
        };
        Some(url)
    }
}

/// The variable of the argument whose long flag is `flag` (`--mqtt-ingress`), in any
/// subcommand.
fn variable_of(command: &mut clap::Command, flag: &str) -> Option<String> {
    command.build();
    let long = flag.strip_prefix("--")?;
    let mut stack = vec![&*command];
    while let Some(c) = stack.pop() {
        for arg in c.get_arguments() {
            if arg.get_long() == Some(long) {
                if let Some(var) = arg.get_env().and_then(|v| v.to_str()) {
                    return Some(var.to_owned());
                }
            }
        }
        stack.extend(c.get_subcommands());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_variable_is_found_with_the_name_meant() {
        let vars = [
            "RINGPUSH_PREFECH",
            "RINGPUSH_AMQP_URL",
            "PATH",
            "RINGPUSH_NOTHING_LIKE_ANY_OTHER",
        ]
        .map(String::from);
        let unknown = unknown_variables(vars);
        assert_eq!(
            unknown,
            [
                ("RINGPUSH_NOTHING_LIKE_ANY_OTHER".to_owned(), None),
                (
                    "RINGPUSH_PREFECH".to_owned(),
                    Some("RINGPUSH_PREFETCH".to_owned())
                ),
            ]
        );
        let known = known_variables();
        for var in [
            "RINGPUSH_AMQP_URL",
            "RINGPUSH_LOG_FORMAT",
            "RINGPUSH_MQTT_INGRESS",
        ] {
            assert!(known.iter().any(|k| k == var), "{var}");
        }
    }
}
