// The migrations are embedded into the binary (`embed_migrations!` in src/db/mod.rs); without
// this, cargo would not rebuild when a migration is added or edited.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
