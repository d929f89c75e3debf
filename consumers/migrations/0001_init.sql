-- tickpipe postgres-sink: initial schema.
-- Money and quantities are numeric(38, 18), the Avro decimal(38, 18) of the
-- schemas, so a value is stored exactly as it travelled; times are timestamptz
-- (microseconds, like the Avro timestamp-micros).

-- Exactly-once: the next Kafka offset to write, per consumer group and
-- partition, updated in the same transaction as the rows.
CREATE TABLE sink_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Current state, one row per natural key; the newest event time wins.
CREATE TABLE assets (
    id                 text PRIMARY KEY,
    rank               integer        NOT NULL,
    symbol             text           NOT NULL,
    name               text           NOT NULL,
    supply             numeric(38,18) NOT NULL,
    max_supply         numeric(38,18),
    market_cap_usd     numeric(38,18),
    volume_usd_24h     numeric(38,18),
    price_usd          numeric(38,18) NOT NULL,
    change_percent_24h numeric(38,18),
    vwap_24h           numeric(38,18),
    explorer           text,
    tokens             jsonb          NOT NULL,
    source             text           NOT NULL,
    event_time         timestamptz    NOT NULL,
    ingest_time        timestamptz    NOT NULL
);
CREATE INDEX assets_rank ON assets (rank);
CREATE INDEX assets_symbol ON assets (symbol);

-- SCD type 2: every distinct state of an asset with the event-time span it held.
-- valid_to is NULL on the open (current) version.
CREATE TABLE asset_history (
    id                 text           NOT NULL,
    valid_from         timestamptz    NOT NULL,
    valid_to           timestamptz,
    rank               integer        NOT NULL,
    symbol             text           NOT NULL,
    name               text           NOT NULL,
    supply             numeric(38,18) NOT NULL,
    max_supply         numeric(38,18),
    market_cap_usd     numeric(38,18),
    volume_usd_24h     numeric(38,18),
    price_usd          numeric(38,18) NOT NULL,
    change_percent_24h numeric(38,18),
    vwap_24h           numeric(38,18),
    explorer           text,
    PRIMARY KEY (id, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);
CREATE UNIQUE INDEX asset_history_one_open ON asset_history (id) WHERE valid_to IS NULL;

CREATE TABLE rates (
    id              text PRIMARY KEY,
    symbol          text           NOT NULL,
    currency_symbol text,
    rate_type       text           NOT NULL,
    rate_usd        numeric(38,18) NOT NULL,
    source          text           NOT NULL,
    event_time      timestamptz    NOT NULL,
    ingest_time     timestamptz    NOT NULL
);

CREATE TABLE exchanges (
    exchange_id          text PRIMARY KEY,
    name                 text           NOT NULL,
    rank                 integer        NOT NULL,
    percent_total_volume numeric(38,18),
    volume_usd           numeric(38,18),
    trading_pairs        integer        NOT NULL,
    socket               boolean,
    exchange_url         text,
    source               text           NOT NULL,
    event_time           timestamptz    NOT NULL,
    ingest_time          timestamptz    NOT NULL
);
CREATE INDEX exchanges_rank ON exchanges (rank);

CREATE TABLE markets (
    exchange_id             text           NOT NULL,
    base_symbol             text           NOT NULL,
    quote_symbol            text           NOT NULL,
    rank                    integer        NOT NULL,
    base_id                 text           NOT NULL,
    quote_id                text           NOT NULL,
    price_quote             numeric(38,18) NOT NULL,
    price_usd               numeric(38,18) NOT NULL,
    volume_usd_24h          numeric(38,18),
    percent_exchange_volume numeric(38,18),
    trades_count_24h        bigint,
    source                  text           NOT NULL,
    event_time              timestamptz    NOT NULL,
    ingest_time             timestamptz    NOT NULL,
    PRIMARY KEY (exchange_id, base_symbol, quote_symbol)
);
CREATE INDEX markets_base ON markets (base_symbol);

-- Append tables. Binance numbers trades and aggregate trades in separate
-- sequences, so the kind is part of a trade's identity.
CREATE TABLE trades (
    venue          text           NOT NULL,
    symbol         text           NOT NULL,
    kind           text           NOT NULL,
    trade_id       bigint         NOT NULL,
    price          numeric(38,18) NOT NULL,
    quantity       numeric(38,18) NOT NULL,
    buyer_is_maker boolean        NOT NULL,
    first_trade_id bigint,
    last_trade_id  bigint,
    source         text           NOT NULL,
    event_time     timestamptz    NOT NULL,
    ingest_time    timestamptz    NOT NULL,
    PRIMARY KEY (venue, symbol, kind, trade_id)
);
CREATE INDEX trades_symbol_time ON trades (symbol, event_time);

CREATE TABLE prices (
    asset_id    text           NOT NULL,
    event_time  timestamptz    NOT NULL,
    price_usd   numeric(38,18) NOT NULL,
    source      text           NOT NULL,
    ingest_time timestamptz    NOT NULL,
    PRIMARY KEY (asset_id, event_time)
);

-- The latest version of a candle (by Kafka order) wins: corrections replace.
CREATE TABLE candles (
    venue                  text           NOT NULL,
    symbol                 text           NOT NULL,
    interval               text           NOT NULL,
    open_time              timestamptz    NOT NULL,
    origin                 text           NOT NULL,
    close_time             timestamptz    NOT NULL,
    open                   numeric(38,18) NOT NULL,
    high                   numeric(38,18) NOT NULL,
    low                    numeric(38,18) NOT NULL,
    close                  numeric(38,18) NOT NULL,
    volume                 numeric(38,18) NOT NULL,
    quote_volume           numeric(38,18) NOT NULL,
    trade_count            bigint         NOT NULL,
    taker_buy_base_volume  numeric(38,18) NOT NULL,
    taker_buy_quote_volume numeric(38,18) NOT NULL,
    first_trade_id         bigint,
    last_trade_id          bigint,
    closed                 boolean        NOT NULL,
    source                 text           NOT NULL,
    event_time             timestamptz    NOT NULL,
    ingest_time            timestamptz    NOT NULL,
    PRIMARY KEY (venue, symbol, interval, open_time, origin)
);
CREATE INDEX candles_symbol_interval_time ON candles (symbol, interval, open_time);

-- Every rejected record, with the reason: the sink's own rejects (component
-- postgres-sink) and those other services published to the dead-letters topic.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    component   text        NOT NULL,
    stage       text        NOT NULL,
    error       text        NOT NULL,
    topic       text,
    partition   integer,
    "offset"    bigint,
    key         bytea,
    payload     bytea       NOT NULL,
    source      text        NOT NULL,
    event_time  timestamptz NOT NULL,
    ingest_time timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_recorded ON dead_letters (recorded_at);
CREATE INDEX dead_letters_topic ON dead_letters (topic, partition, "offset");

-- Applies one asset state observed at event time t to asset_history, in any
-- arrival order: a state equal to the version holding t changes nothing; a
-- different one splits that version at t; neighbours with equal values merge.
CREATE FUNCTION tickpipe_asset_history_apply(
    p_id text, p_t timestamptz, p_rank integer, p_symbol text, p_name text,
    p_supply numeric, p_max_supply numeric, p_market_cap_usd numeric,
    p_volume_usd_24h numeric, p_price_usd numeric, p_change_percent_24h numeric,
    p_vwap_24h numeric, p_explorer text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    cur asset_history%ROWTYPE;
    nxt asset_history%ROWTYPE;
    new_vals record;
    end_at timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tickpipe_asset_history:' || p_id));
    new_vals := ROW(p_rank, p_symbol, p_name, p_supply, p_max_supply, p_market_cap_usd,
                    p_volume_usd_24h, p_price_usd, p_change_percent_24h, p_vwap_24h, p_explorer);
    SELECT * INTO cur FROM asset_history
     WHERE id = p_id AND valid_from <= p_t ORDER BY valid_from DESC LIMIT 1;
    IF FOUND AND ROW(cur.rank, cur.symbol, cur.name, cur.supply, cur.max_supply, cur.market_cap_usd,
                     cur.volume_usd_24h, cur.price_usd, cur.change_percent_24h, cur.vwap_24h, cur.explorer)
                 IS NOT DISTINCT FROM new_vals THEN
        RETURN;
    END IF;
    IF FOUND AND cur.valid_from = p_t THEN
        -- A different state at the same instant: the later arrival corrects it.
        DELETE FROM asset_history WHERE id = p_id AND valid_from = p_t;
        end_at := cur.valid_to;
    ELSIF FOUND THEN
        end_at := cur.valid_to;
        UPDATE asset_history SET valid_to = p_t WHERE id = p_id AND valid_from = cur.valid_from;
    ELSE
        SELECT min(valid_from) INTO end_at FROM asset_history WHERE id = p_id AND valid_from > p_t;
    END IF;
    -- Merge with the following version when it holds the same values.
    IF end_at IS NOT NULL THEN
        SELECT * INTO nxt FROM asset_history WHERE id = p_id AND valid_from = end_at;
        IF FOUND AND ROW(nxt.rank, nxt.symbol, nxt.name, nxt.supply, nxt.max_supply, nxt.market_cap_usd,
                         nxt.volume_usd_24h, nxt.price_usd, nxt.change_percent_24h, nxt.vwap_24h, nxt.explorer)
                     IS NOT DISTINCT FROM new_vals THEN
            DELETE FROM asset_history WHERE id = p_id AND valid_from = end_at;
            end_at := nxt.valid_to;
        END IF;
    END IF;
    -- Merge with the previous version when it now ends at t with the same values.
    SELECT * INTO cur FROM asset_history WHERE id = p_id AND valid_to = p_t;
    IF FOUND AND ROW(cur.rank, cur.symbol, cur.name, cur.supply, cur.max_supply, cur.market_cap_usd,
                     cur.volume_usd_24h, cur.price_usd, cur.change_percent_24h, cur.vwap_24h, cur.explorer)
                 IS NOT DISTINCT FROM new_vals THEN
        UPDATE asset_history SET valid_to = end_at WHERE id = p_id AND valid_from = cur.valid_from;
        RETURN;
    END IF;
    INSERT INTO asset_history (id, valid_from, valid_to, rank, symbol, name, supply, max_supply,
                               market_cap_usd, volume_usd_24h, price_usd, change_percent_24h, vwap_24h, explorer)
    VALUES (p_id, p_t, end_at, p_rank, p_symbol, p_name, p_supply, p_max_supply, p_market_cap_usd,
            p_volume_usd_24h, p_price_usd, p_change_percent_24h, p_vwap_24h, p_explorer);
END;
$$;
