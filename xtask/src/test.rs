use anyhow::Result;
use clap::Args;
#[derive(Args)]
pub struct TestOptions {}
pub fn run(_o: &TestOptions) -> Result<()> { Ok(()) }
