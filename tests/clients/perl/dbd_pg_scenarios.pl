#!/usr/bin/perl
# DBD::Pg through the gateway: each scenario of tests/clients/contract.py, printed as one JSON
# line. DBD::Pg drives the system's libpq, so SNI comes from host + hostaddr in the DSN.
use strict;
use warnings;
use utf8;
use DBI;
use DBD::Pg qw(:async);
use Encode qw(decode);
use JSON::PP;
use Time::HiRes qw(time sleep);

sub env_text { return decode('UTF-8', $ENV{ $_[0] }) }

sub dsn {
    my (%opt) = @_;
    my $sni = delete $opt{sni} // 1;
    my %p = (port => $ENV{PGSNI_PORT}, dbname => 'postgres', sslmode => 'verify-full',
             sslrootcert => $ENV{PGSNI_CA}, connect_timeout => 20, %opt);
    if ($sni) {
        @p{qw(host hostaddr)} = ($ENV{PGSNI_HOST}, $ENV{PGSNI_ADDR});
    } else {
        @p{qw(host options)} = ($ENV{PGSNI_ADDR}, "endpoint=$ENV{PGSNI_DB}");
    }
    return 'dbi:Pg:' . join(';', map {"$_=$p{$_}"} sort keys %p);
}

sub connect_db {
    return DBI->connect(dsn(@_), $ENV{PGSNI_USER}, $ENV{PGSNI_PASSWORD},
                        {RaiseError => 1, PrintError => 0, AutoCommit => 1, pg_enable_utf8 => 1});
}

sub value { my ($dbh, $sql, @params) = @_; return ($dbh->selectrow_array($sql, undef, @params))[0] }

sub bool { return $_[0] ? JSON::PP::true : JSON::PP::false }

sub landing {
    my $dbh = connect_db(@_);
    my ($server_name, $data_directory, $tls) = $dbh->selectrow_array($ENV{PGSNI_LANDING_SQL});
    $dbh->disconnect;
    return {server_name => $server_name, data_directory => $data_directory, tls => $tls};
}

sub extended {
    my $dbh = connect_db();
    my ($sum, $text, $null) = $dbh->selectrow_array($ENV{PGSNI_EXTENDED_SQL}, undef, 40, 2,
                                                    env_text('PGSNI_TEXT'), undef);
    my $sth = $dbh->prepare($ENV{PGSNI_PREPARED_SQL});  # server-side, named (pg_server_prepare)
    my @prepared = map { $sth->execute($_); 0 + ($sth->fetchrow_array)[0] } (1, 2);
    my $count = value($dbh, 'select count(*) from pg_prepared_statements');
    $dbh->disconnect;
    return {sum => 0 + $sum, text => $text, null => $null, prepared => \@prepared, server_prepared => 0 + $count};
}

sub copy {
    my $dbh = connect_db();
    $dbh->do('create temp table t(id int, v text)');
    $dbh->do('copy t from stdin');
    $dbh->pg_putcopydata(join '', map {"$_\trow $_ é\n"} 1 .. $ENV{PGSNI_COPY_ROWS});
    $dbh->pg_putcopyend();
    my ($rows, $sum) = $dbh->selectrow_array('select count(*), sum(id) from t');
    my ($out, $chunk) = ('', '');
    $dbh->do('copy (select * from t order by id) to stdout');
    $out .= $chunk while $dbh->pg_getcopydata($chunk) >= 0;
    $dbh->disconnect;
    utf8::decode($out) unless utf8::is_utf8($out);
    my @lines = split /\n/, $out;
    return {rows_in => 0 + $rows, sum_in => 0 + $sum, out_lines => scalar @lines,
            out_first => $lines[0], out_last => $lines[-1]};
}

sub notify {
    my $dbh = connect_db();
    $dbh->do('listen perl_ch');
    $dbh->do(q{notify perl_ch, 'hello'});
    my $note;
    for (1 .. 100) {
        last if $note = $dbh->pg_notifies;
        sleep 0.05;
    }
    my $result = {pid => $dbh->{pg_pid}, sql_pid => 0 + value($dbh, 'select pg_backend_pid()'),
                  note_pid => $note && 0 + $note->[1], payload => $note && $note->[2]};
    $dbh->disconnect;
    return $result;
}

sub cancel {
    my $dbh = connect_db();
    my $started = time;
    $dbh->do($ENV{PGSNI_CANCEL_SQL}, {pg_async => PG_ASYNC});
    sleep 0.5;
    # pg_cancel sends the cancel, then reads the query's result: the error, 57014, is the state
    $dbh->pg_cancel;
    my $result = {sqlstate => $dbh->state, seconds => time - $started, after => 0 + value($dbh, 'select 1')};
    $dbh->disconnect;
    return $result;
}

sub terminate {
    my ($dbh, $other) = (connect_db(), connect_db());
    my $pid = $dbh->{pg_pid};
    my $result = {pid => $pid, sql_pid => 0 + value($dbh, 'select pg_backend_pid()'),
                  terminated => bool(value($other, 'select pg_terminate_backend($1, 5000)', $pid))};
    my $ok = eval { value($dbh, 'select 1'); 1 };
    @$result{qw(failed detail)} = (bool(!$ok), $ok ? '' : "$@");
    $other->disconnect;
    return $result;
}

sub channel_binding {
    # libpq refuses to finish a login without SCRAM-SHA-256-PLUS when channel_binding=require
    my $dbh = connect_db(channel_binding => 'require');
    my $result = {mechanism => 'SCRAM-SHA-256-PLUS', one => 0 + value($dbh, 'select 1')};
    $dbh->disconnect;
    return $result;
}

my @scenarios = (
    [sni => sub { landing() }],
    [endpoint => sub { landing(sni => 0) }],
    [extended => \&extended],
    [copy => \&copy],
    [notify => \&notify],
    [cancel => \&cancel],
    [terminate => \&terminate],
    [channel_binding => \&channel_binding],
);
my %results;
for my $s (@scenarios) {
    my ($name, $run) = @$s;
    $results{$name} = eval { $run->() } // {error => "$@"};
}
print JSON::PP->new->utf8->canonical->encode(\%results), "\n";
