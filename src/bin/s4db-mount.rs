//! `s4db-mount`: mount an s4db database as a directory. The work is in `s4db::mount`.

fn main() -> std::process::ExitCode {
    s4db::buffer_pool::keep_freed_memory();
    s4db::mount::main()
}
